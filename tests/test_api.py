"""The public surface: what is exported, typed, and documented."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import re
from pathlib import Path

import lehnz_async
from lehnz_async import LehnzError, Tracker, _config
from lehnz_async._config import Config

ROOT = Path(__file__).resolve().parent.parent


def test_all_exports_what_exists_once() -> None:
    names = lehnz_async.__all__
    assert len(set(names)) == len(names)
    assert [name for name in names if not hasattr(lehnz_async, name)] == []
    assert {"Tracker", "Event", "Stats", "LehnzError", "DeliveryError"} <= set(names)


def test_every_exception_has_one_root() -> None:
    errors = [getattr(lehnz_async, n) for n in lehnz_async.__all__ if n.endswith("Error")]
    assert errors and all(issubclass(e, LehnzError) for e in errors)


def test_the_package_is_typed() -> None:
    assert (ROOT / "lehnz_async" / "py.typed").exists()


# -- the options: declared once, in _config.Config (see the first test's docstring) ----


def _declared() -> dict[str, object]:
    """Each option and its default, as `Config` declares them, in order."""
    return {field.name: field.default for field in dataclasses.fields(Config)}


def _same(a: object, b: object) -> bool:
    return type(a) is type(b) and a == b


def _printed(default: object) -> str:
    """A default as the README prints it (first, in backticks)."""
    return f'"{default}"' if isinstance(default, str) else repr(default)


def _default_sources(tree: ast.AST, owner: str, function: str | None) -> dict[str, str]:
    """Each option's default as written in source: in `owner`'s field declarations, or
    in the signature of its method `function`."""
    (cls,) = [n for n in ast.walk(tree) if isinstance(n, ast.ClassDef) and n.name == owner]
    if function is None:
        return {
            n.target.id: ast.unparse(n.value)
            for n in cls.body
            if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name) and n.value
        }
    (fn,) = [n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == function]
    args = fn.args
    positional = args.args[len(args.args) - len(args.defaults) :]
    written = {a.arg: ast.unparse(d) for a, d in zip(positional, args.defaults, strict=True)}
    written.update(
        {a.arg: ast.unparse(d) for a, d in zip(args.kwonlyargs, args.kw_defaults, strict=True) if d}
    )
    return written


def _names_out_of_step(found: list[str], where: str, ordered: bool = True) -> list[str]:
    """What is wrong with the option names found in ``where``, against Config's."""
    declared = list(_declared())
    wrong = [f"{where} lacks option {name!r}" for name in declared if name not in found]
    wrong += [
        f"{where} has option {name!r}, which Config does not declare"
        for name in found
        if name not in declared
    ]
    if ordered and not wrong and found != declared:
        name = next(f for f, d in zip(found, declared, strict=True) if f != d)
        wrong.append(f"{where}: option {name!r} is not at the place Config declares it")
    return wrong


def test_the_signature_takes_the_declared_options_with_their_defaults() -> None:
    """`Config` (lehnz_async/_config.py) declares every option of `Tracker()`: its name,
    type and default (a ``DEFAULT_*`` constant of _config, or None, True or False). The
    tests below hold each other place an option is written to it, and a failure names
    the option out of step: this one the signature (names, order, defaults), then how
    defaults are written, `Tracker`'s docstring (Args: names, order) and the README's
    options table (names, defaults as printed).

    Adding an option (``stall_timeout``, say) is, in this order:

    1. _config.py: ``DEFAULT_STALL_TIMEOUT: float | None = 60.0``, and in `Config`, at
       the place the option takes in the signature, ``stall_timeout: float | None =
       DEFAULT_STALL_TIMEOUT``, with its check in ``__post_init__``;
    2. `Tracker.__init__`: ``stall_timeout: float | None = DEFAULT_STALL_TIMEOUT`` at
       the same place (``__init__`` hands every argument to `Config` as given: nothing
       else to write there; the engine reads ``config.stall_timeout``);
    3. `Tracker`'s docstring: a ``stall_timeout:`` entry under Args, at the same place
       (the option's doc, written once: the API reference is built from it);
    4. README.md, "## Options": a row ``| `stall_timeout` | `60.0` | what it does |``.
    """
    declared = _declared()
    parameters = inspect.signature(Tracker).parameters
    wrong = _names_out_of_step(list(parameters), "Tracker()")
    for name, parameter in parameters.items():
        if name in declared and not _same(parameter.default, declared[name]):
            wrong.append(
                f"option {name!r}: Tracker() defaults to {parameter.default!r}, Config "
                f"declares {declared[name]!r}"
            )
    assert not wrong, "\n".join(wrong)


def test_each_default_is_written_once_as_a_default_constant() -> None:
    """A default other than None, True and False is `DEFAULT_<OPTION>` in _config, and
    both Config and the signature name that constant rather than repeat its value."""
    package = ROOT / "lehnz_async"
    sources = {
        "Config": _default_sources(ast.parse((package / "_config.py").read_text()), "Config", None),
        "Tracker.__init__": _default_sources(
            ast.parse((package / "_tracker.py").read_text()), "Tracker", "__init__"
        ),
    }
    wrong = []
    for name in _declared():
        constant = f"DEFAULT_{name.upper()}"
        for where, written in sources.items():
            text = written.get(name)
            if text not in ("None", "True", "False", constant):
                wrong.append(
                    f"option {name!r}: {where} writes its default as {text}; "
                    f"write {constant} (defined in lehnz_async/_config.py)"
                )
        if sources["Config"].get(name) == constant and not hasattr(_config, constant):
            wrong.append(f"option {name!r}: lehnz_async/_config.py has no {constant}")
    assert not wrong, "\n".join(wrong)


def test_the_docstring_documents_each_declared_option_in_order() -> None:
    doc = inspect.getdoc(Tracker) or ""
    section = doc[doc.index("\nArgs:\n") :].split("\n\n")[0]
    entries = dict(re.findall(r"^    (\w+): (.*)$", section, re.M))
    wrong = _names_out_of_step(list(entries), "Tracker's docstring (Args)")
    wrong += [
        f"Tracker's docstring (Args): the entry of {name!r} is empty"
        for name, text in entries.items()
        if not text.strip()
    ]
    assert not wrong, "\n".join(wrong)


def test_the_readme_table_shows_each_declared_option_and_its_default() -> None:
    """The README's options table: a row for each option, and none for another; its
    default column starts with the declared default, as Python writes it, in backticks
    (`` `None` → `$LEHNZ_API_KEY` `` where None stands for something)."""
    readme = (ROOT / "README.md").read_text()
    start = readme.index("\n## Options\n")
    table = readme[start : readme.index("\n## ", start + 1)]
    rows = {name: cell for name, cell in re.findall(r"^\| `(\w+)` \| ([^|]*) \|", table, re.M)}
    declared = _declared()
    wrong = _names_out_of_step(list(rows), "the README's options table", ordered=False)
    for name, cell in rows.items():
        if name not in declared:
            continue
        shown = re.match(r"`([^`]*)`", cell.strip())
        expected = _printed(declared[name])
        if shown is None or shown.group(1) != expected:
            wrong.append(
                f"option {name!r}: the README's options table shows {cell.strip()!r} as its "
                f"default; Config declares `{expected}`"
            )
    assert not wrong, "\n".join(wrong)
