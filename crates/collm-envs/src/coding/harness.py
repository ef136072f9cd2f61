# collm coding harness: runs inside the sandbox, once per joint action.
# Reads spec.json (then deletes it), reports static facts about the two agents' code, then runs
# each assert of the problem's check(candidate) under a per-test timer. Every report line starts
# with a nonce the model-written code cannot see, so it cannot forge results by printing.
import ast, json, os, re, signal, sys, textwrap

with open("spec.json", encoding="utf-8") as f:
    SPEC = json.load(f)
os.remove("spec.json")
NONCE = SPEC.pop("nonce")
_write = sys.__stdout__.write
_flush = sys.__stdout__.flush


def out(kind, obj):
    _write(NONCE + " " + kind + " " + json.dumps(obj) + "\n")
    _flush()


FENCE = re.compile(r"^\s*```")
DEF = re.compile(r"^(\s*)def\s+(\w+)\s*\(")


def clean(text):
    """The response without markdown fence lines."""
    return "\n".join(l for l in text.splitlines() if not FENCE.match(l))


def format_ok(code):
    """One top-level function definition with a return; at top level only it, its decorators,
    imports and comments."""
    defs, has_return = 0, False
    for line in code.splitlines():
        if not line.strip() or line.startswith((" ", "\t")):
            continue
        s = line.strip()
        if s.startswith("#") or s.startswith("@") or s.startswith("import ") or s.startswith("from "):
            continue
        if DEF.match(line):
            defs += 1
            continue
        return False
    return defs == 1 and re.search(r"\breturn\b", code) is not None


def extract(code, name):
    """The last definition of `name` in the code: its def line and every following line that is
    blank or indented deeper."""
    lines = code.splitlines()
    start = None
    for i, l in enumerate(lines):
        m = DEF.match(l)
        if m and m.group(2) == name:
            start = i
    if start is None:
        return ""
    indent = len(DEF.match(lines[start]).group(1))
    body = [lines[start]]
    for l in lines[start + 1:]:
        if not l.strip() or len(l) - len(l.lstrip()) > indent:
            body.append(l)
        else:
            break
    return textwrap.dedent("\n".join(body)).strip()


def defined_with_return(func):
    return bool(func) and re.search(r"\breturn\b", func) is not None


def calls_aux(node):
    return isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "aux"


def aux_usage(main_func):
    """(called, thin wrapper, reasons its result is ignored) from main's syntax tree."""
    try:
        tree = ast.parse(main_func)
    except SyntaxError:
        return False, False, []
    fn = next((n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))), None)
    if fn is None:
        return False, False, []
    called = any(calls_aux(n) for n in ast.walk(fn))
    body = list(fn.body)
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str):
        body = body[1:]
    body = [s for s in body if not isinstance(s, ast.Pass)]
    wrapper = False
    if len(body) == 1 and isinstance(body[0], ast.Return) and body[0].value is not None:
        wrapper = any(calls_aux(n) for n in ast.walk(body[0].value))
    elif len(body) == 2 and isinstance(body[0], ast.Assign) and calls_aux(body[0].value) \
            and len(body[0].targets) == 1 and isinstance(body[0].targets[0], ast.Name) \
            and isinstance(body[1], ast.Return) and isinstance(body[1].value, ast.Name) \
            and body[1].value.id == body[0].targets[0].id:
        wrapper = True
    ignored = []
    loads = {n.id for n in ast.walk(fn) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}
    for n in ast.walk(fn):
        if isinstance(n, ast.Expr) and calls_aux(n.value):
            ignored.append("line %d: aux(...) called as a statement, its result dropped" % n.lineno)
        elif isinstance(n, ast.Assign) and calls_aux(n.value):
            names = [t.id for t in n.targets if isinstance(t, ast.Name)]
            if names and not any(v in loads for v in names):
                ignored.append("line %d: the result of aux(...) is stored in %s and never read" % (n.lineno, names[0]))
    return called, wrapper, ignored


def prompt_imports(prompt):
    seen, out_lines = set(), []
    for line in prompt.splitlines():
        s = line.strip()
        if (re.match(r"^from\s+[\w.]+\s+import\s+.*$", s) or re.match(r"^import\s+[\w.,\s]+$", s)) and s not in seen:
            seen.add(s)
            out_lines.append(s)
    return out_lines


aux_code, main_code = clean(SPEC["aux"]), clean(SPEC["main"])
entry = SPEC["entry_point"]
aux_func, main_func = extract(aux_code, "aux"), extract(main_code, entry)
parts = ["\n".join(prompt_imports(SPEC["prompt"]))] + [p for p in (aux_func, main_func) if p]
combined = "\n\n".join(p for p in parts if p)
syntax_error = None
try:
    ast.parse(combined)
except SyntaxError as e:
    syntax_error = {"line": e.lineno, "column": e.offset, "message": e.msg}
called, wrapper, ignored = aux_usage(main_func)

# The tests: every assert in check(candidate); other statements there run in order as setup.
tests, setup_error = [], None
try:
    test_tree = ast.parse(SPEC["test"])
except SyntaxError as e:
    test_tree, setup_error = None, "the problem's test does not parse: %s" % e
check_fn, module_setup = None, []
if test_tree is not None:
    for node in test_tree.body:
        if isinstance(node, ast.FunctionDef) and node.name == "check":
            check_fn = node
        elif not isinstance(node, ast.FunctionDef):
            module_setup.append(node)
steps = []
if check_fn is not None:
    for stmt in check_fn.body:
        src = ast.get_source_segment(SPEC["test"], stmt) or ast.dump(stmt)[:200]
        steps.append((isinstance(stmt, ast.Assert), stmt, " ".join(src.split())[:300]))
n_tests = sum(1 for is_test, _, _ in steps if is_test)

out("static", {
    "format_ok": [format_ok(aux_code), format_ok(main_code)],
    "aux_func": aux_func,
    "main_func": main_func,
    "aux_defined": defined_with_return(aux_func),
    "main_defined": defined_with_return(main_func),
    "syntax_error": syntax_error,
    "aux_called": called,
    "thin_wrapper": wrapper,
    "aux_ignored": ignored,
    "tests_total": n_tests,
    "setup_error": setup_error,
})


class _TestTimeout(BaseException):
    pass


def _alarm(signum, frame):
    raise _TestTimeout()


signal.signal(signal.SIGALRM, _alarm)
TIMEOUT = float(SPEC["per_test_timeout"])


def timed(code, ns):
    signal.setitimer(signal.ITIMER_REAL, TIMEOUT)
    try:
        exec(code, ns)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)


def describe(e):
    msg = str(e)
    return type(e).__name__ + (": " + msg[:200] if msg else "")


if syntax_error is None and n_tests > 0 and main_func:
    ns = {"__name__": "__collm_solution__"}
    defined, error = True, None
    try:
        timed(compile(combined, "solution.py", "exec"), ns)
    except _TestTimeout:
        defined, error = False, "defining the functions ran past %.1f s" % TIMEOUT
    except BaseException as e:
        defined, error = False, "defining the functions raised " + describe(e)
    candidate = ns.get(entry)
    if defined and not callable(candidate):
        defined, error = False, "%s is not defined after running the code" % entry
    tns = {"__name__": "__collm_test__", "candidate": candidate}
    if defined:
        for node in module_setup:
            try:
                timed(compile(ast.Module([node], []), "test.py", "exec"), tns)
            except BaseException:
                pass
        tns["candidate"] = candidate
    timeouts = 0
    for is_test, stmt, src in steps:
        if not defined:
            if is_test:
                out("test", {"source": src, "passed": False, "error": error})
            continue
        code = compile(ast.Module([stmt], []), "test.py", "exec")
        try:
            timed(code, tns)
            if is_test:
                out("test", {"source": src, "passed": True, "error": None})
        except _TestTimeout:
            timeouts += 1
            if is_test:
                out("test", {"source": src, "passed": False, "error": "timed out after %.1f s" % TIMEOUT})
            if timeouts >= 3:
                defined, error = False, "skipped after 3 timeouts"
        except BaseException as e:
            if is_test:
                out("test", {"source": src, "passed": False, "error": describe(e)})
out("done", {})
