"""The package's shape: one module per concern, each saying in its docstring what it owns, none too long, and no
import circle (a module importing one that imports it back, directly or by another way, at load time or inside a
function), so each concern can be read and changed from its own module down."""
import ast

from conftest import ROOT

PACKAGE = ROOT / "kandinsky_finetune"
MAX_LINES = 330


def modules():
    return {path.stem: path for path in sorted(PACKAGE.glob("*.py")) if path.stem != "__init__"}


def imported(tree, names):
    """The package's modules this module imports, anywhere in it (module level or inside a function)."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1 and node.module is None:  # from . import x, y
                found.update(alias.name for alias in node.names)
            elif node.level == 1:  # from .x import y
                found.add(node.module.split(".")[0])
            elif node.level == 0 and node.module and node.module.split(".")[0] == PACKAGE.name:
                parts = node.module.split(".")
                found.update([parts[1]] if len(parts) > 1 else [alias.name for alias in node.names])
        elif isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == PACKAGE.name and len(parts) > 1:
                    found.add(parts[1])
    return found & names


def import_graph():
    names = set(modules())
    return {name: imported(ast.parse(path.read_text()), names) for name, path in modules().items()}


def find_cycle(graph):
    """A list of modules [a, b, ..., a] going round a circle, or None."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_find_cycle_finds_a_circle_through_a_function_level_import():
    tree = ast.parse("from .b import x\ndef f():\n    from . import c\n")
    assert imported(tree, {"a", "b", "c"}) == {"b", "c"}
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_no_import_circle_in_the_package():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_every_module_says_what_it_owns_and_none_is_too_long():
    undocumented, too_long = [], []
    for name, path in modules().items():
        text = path.read_text()
        if not (ast.get_docstring(ast.parse(text)) or "").strip():
            undocumented.append(f"{name}.py")
        if len(text.splitlines()) > MAX_LINES:
            too_long.append(f"{name}.py ({len(text.splitlines())} lines)")
    assert not undocumented, "no docstring saying what the module owns: " + ", ".join(undocumented)
    assert not too_long, f"over {MAX_LINES} lines, to split along their concerns: " + ", ".join(too_long)
