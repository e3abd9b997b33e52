"""docs/troubleshooting.md documents every message the user can get, checked against the code.

The package source is parsed with :mod:`ast` (nothing is imported or run). Every message the
user can see is collected: each ``AslprepError(...)``, each ``.error(key, message)`` of a
``SidecarFields`` object in ``bids/`` (with the ``why`` texts its other methods add), the
``ValueError`` texts that ``bids/`` wraps into errors, the per-run failures, the warnings and
the command line's own lines. Of each message the longest constant fragment (the text outside
the ``{placeholders}``) must appear verbatim on the page, so that a new message cannot be added
without documenting it. Conversely every message quoted in a ``text`` block of the page must
still come from the code.
"""

from __future__ import annotations

import ast
import re
import string
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "aslprep_lite"
PAGE = ROOT / "docs" / "troubleshooting.md"

#: A fragment at least this long identifies a message on its own.
MIN_LONGEST = 12
#: Without such a fragment, every fragment at least this long must appear.
MIN_FRAGMENT = 6
#: Punctuation and white space stripped from both ends of a fragment.
STRIP = string.punctuation + string.whitespace
#: Methods of ``bids.files.SidecarFields`` whose first argument is a field name (and which
#: may add a ``why``).
FIELD_METHODS = {"error", "required", "string", "boolean", "number", "first_number", "per_volume"}
#: The modules that read sidecar fields.
FIELD_MODULES = ("bids/files.py", "bids/validation.py")
#: Functions whose ``ValueError`` message ``bids/`` passes on to the user unchanged
#: (``plan_subtraction`` for the aslcontext, ``blood_t1`` -> ``_by_field`` for the field).
WRAPPED_VALUE_ERRORS = {
    "quant/deltam.py": {"plan_subtraction"},
    "quant/constants.py": {"_by_field"},
}
#: Functions whose returned strings are quality warnings.
WARNING_FUNCTIONS = {
    "quant/cbf.py": {"implausible_cbf"},
    "bids/validation.py": {"_short_delay_warnings", "_unpaired_note"},
}
#: Functions whose f-strings are printed (the reason of a failed processing step).
TEXT_FUNCTIONS = {"cli/crashes.py": {"crash_messages"}}
#: The prefix of every error line: it does not identify a message.
PREFIX = "aslprep-lite: error"
#: Logger methods whose format string reaches the user.
LOG_METHODS = {"warning", "error", "critical"}


@dataclass(frozen=True)
class Message:
    """One user-facing message in the code: where it is and the constant text it has."""

    where: str
    fragments: tuple[str, ...]
    field: str | None = None

    def required(self) -> list[str]:
        """The fragment(s) that must appear on the page."""
        stripped = [f.strip(STRIP) for f in self.fragments]
        longest = max(stripped, key=len, default="")
        if len(longest) >= MIN_LONGEST:
            return [longest]
        return [f for f in stripped if len(f) >= MIN_FRAGMENT]


def _fragments(node: ast.AST | None) -> list[str]:
    """Constant text pieces of a message expression; a placeholder splits the text."""
    if node is None:
        return []
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value]
    if isinstance(node, ast.JoinedStr):
        return [
            part.value
            for part in node.values
            if isinstance(part, ast.Constant) and isinstance(part.value, str)
        ]
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        return _fragments(node.left) + _fragments(node.right)
    if isinstance(node, ast.IfExp):
        return _fragments(node.body) + _fragments(node.orelse)
    if isinstance(node, ast.List):
        return [piece for element in node.elts for piece in _fragments(element)]
    return []


def _percent_fragments(node: ast.AST) -> list[str]:
    """Constant pieces of a logging format string (``%s``/``%d`` are placeholders)."""
    return [piece for text in _fragments(node) for piece in re.split(r"%[-#0 +]*\d*[sdfgr]", text)]


def _argument(call: ast.Call, index: int, name: str) -> ast.AST | None:
    if len(call.args) > index:
        return call.args[index]
    return next((kw.value for kw in call.keywords if kw.arg == name), None)


def _callee(call: ast.Call) -> str:
    func = call.func
    if isinstance(func, ast.Name):
        return func.id
    if isinstance(func, ast.Attribute):
        return func.attr
    return ""


def _receiver(call: ast.Call) -> str | None:
    """``x`` of ``x.method(...)`` and of ``y.x.method(...)``."""
    func = call.func
    if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name):
        return func.value.id
    if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Attribute):
        return func.value.attr
    return None


def _fields_names(tree: ast.Module) -> set[str]:
    """Names bound to ``SidecarFields``: annotated parameters, ``= SidecarFields(...)``."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.arg) and node.annotation is not None:
            if "SidecarFields" in ast.unparse(node.annotation):
                names.add(node.arg)
        elif isinstance(node, ast.Assign) and any(
            # SidecarFields(...) or a constructor such as SidecarFields.of_image(...)
            isinstance(call, ast.Call) and ast.unparse(call.func).startswith("SidecarFields")
            for call in ast.walk(node.value)
        ):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
    return names


def _fields_self_calls(tree: ast.Module) -> set[int]:
    """ids of ``self.<method>(...)`` calls inside ``class SidecarFields``."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and node.name == "SidecarFields":
            found.update(
                id(call)
                for call in ast.walk(node)
                if isinstance(call, ast.Call) and _receiver(call) == "self"
            )
    return found


def _functions(tree: ast.Module, names: set[str]) -> Iterator[ast.FunctionDef]:
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef) and node.name in names:
            yield node


def _is_stderr_print(call: ast.Call) -> bool:
    return _callee(call) == "print" and any(
        kw.arg == "file" and ast.unparse(kw.value) == "sys.stderr" for kw in call.keywords
    )


def _failure_texts(node: ast.AST) -> Iterator[ast.AST]:
    """Messages of per-run failures: ``(asl_file, message)`` tuples put in ``failures``."""
    if (
        isinstance(node, ast.Call)
        and _callee(node) == "append"
        and _receiver(node) == "failures"
        and node.args
        and isinstance(node.args[0], ast.Tuple)
    ):
        yield node.args[0].elts[-1]
    target = None
    if isinstance(node, ast.AnnAssign | ast.Assign):
        targets = [node.target] if isinstance(node, ast.AnnAssign) else node.targets
        target = next((t.id for t in targets if isinstance(t, ast.Name)), None)
    if target == "failures" and isinstance(node.value, ast.ListComp | ast.List):
        elements = [node.value.elt] if isinstance(node.value, ast.ListComp) else node.value.elts
        for element in elements:
            if isinstance(element, ast.Tuple):
                yield element.elts[-1]


@cache
def collect_messages() -> tuple[Message, ...]:
    """Every user-facing message of the package, in source order (parsed once per session)."""
    messages: list[Message] = []
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE).as_posix()
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))

        def add(
            node: ast.AST, fragments: list[str], field: str | None = None, where: str = relative
        ) -> None:
            messages.append(
                Message(f"aslprep_lite/{where}:{node.lineno}", tuple(fragments), field)
            )

        fields_names = _fields_names(tree) if relative in FIELD_MODULES else set()
        fields_self = _fields_self_calls(tree) if relative in FIELD_MODULES else set()
        for node in ast.walk(tree):
            for text in _failure_texts(node):
                add(text, _fragments(text))
            if not isinstance(node, ast.Call):
                continue
            callee = _callee(node)
            if callee == "AslprepError":
                add(node, _fragments(_argument(node, 0, "message")))
            elif callee in FIELD_METHODS and (
                _receiver(node) in fields_names or id(node) in fields_self
            ):
                key = _argument(node, 0, "key")
                field = key.value if isinstance(key, ast.Constant) else None
                if callee == "error":
                    add(node, _fragments(_argument(node, 1, "message")), field)
                else:
                    why = _argument(node, 1, "why") if callee in ("required", "boolean") else None
                    why = why or next((k.value for k in node.keywords if k.arg == "why"), None)
                    add(node, _fragments(why), field)
            elif callee in LOG_METHODS and _receiver(node) == "LOGGER":
                add(node, _percent_fragments(node.args[0]))
            elif callee == "append" and _receiver(node) == "warnings":
                add(node, _fragments(node.args[0]))
            elif callee == "assume" and _receiver(node) == "notes":
                # a filled-in value; its warn= text is printed
                warn = next((k.value for k in node.keywords if k.arg == "warn"), None)
                add(node, _fragments(warn))
            elif _is_stderr_print(node):
                add(node, _fragments(node.args[0]))
        for function in _functions(tree, WRAPPED_VALUE_ERRORS.get(relative, set())):
            for node in ast.walk(function):
                if isinstance(node, ast.Call) and _callee(node) == "ValueError":
                    add(node, _fragments(_argument(node, 0, "message")))
        for function in _functions(tree, WARNING_FUNCTIONS.get(relative, set())):
            for node in ast.walk(function):
                if isinstance(node, ast.Return) and node.value is not None:
                    add(node, _fragments(node.value))
        for function in _functions(tree, TEXT_FUNCTIONS.get(relative, set())):
            for node in ast.walk(function):
                if isinstance(node, ast.JoinedStr):
                    add(node, _fragments(node))
    return tuple(messages)


def _normalise(text: str) -> str:
    """One space for any run of white space (the page may wrap prose)."""
    return " ".join(text.split())


def _page() -> str:
    return PAGE.read_text(encoding="utf-8")


def test_collector_finds_the_messages() -> None:
    messages = collect_messages()
    checked = [m for m in messages if m.required()]
    assert len(checked) >= 80, f"only {len(checked)} messages found: is the collector broken?"
    kinds = {m.where.split(":")[0] for m in checked}
    for module in (
        "bids/validation.py",
        "bids/files.py",
        "bids/discovery.py",
        "config.py",
        "images.py",
        "cli/run.py",
        "cli/crashes.py",
        "quant/cbf.py",
    ):
        assert f"aslprep_lite/{module}" in kinds, f"no message found in {module}"


def test_every_message_is_documented() -> None:
    page = _normalise(_page())
    missing = []
    for message in collect_messages():
        for fragment in message.required():
            if _normalise(fragment) not in page:
                missing.append(f"{message.where}: {fragment!r}")
        if message.field and message.field not in page:
            missing.append(f"{message.where}: field {message.field}")
    assert not missing, (
        "docs/troubleshooting.md does not document these messages (add the message as the "
        "user sees it, its cause and its fix):\n" + "\n".join(missing)
    )


def test_every_documented_message_exists() -> None:
    """Each line of a ``text`` block on the page is a message the code can still produce."""
    fragments = {f for m in collect_messages() for f in m.required()} - {PREFIX}
    blocks = re.findall(r"^```text\n(.*?)^```", _page(), flags=re.DOTALL | re.MULTILINE)
    assert blocks, "docs/troubleshooting.md quotes no messages in ```text blocks"
    stale = [
        line
        for block in blocks
        for line in block.splitlines()
        if line.strip() and not any(fragment in line for fragment in fragments)
    ]
    assert not stale, (
        "docs/troubleshooting.md quotes messages the code no longer produces:\n" + "\n".join(stale)
    )
