"""The Slicer extension without the Slicer application: its catalog entry, CMake lists, panel
(.ui), icon and requirements, and the module's parts that need no Qt (TransferSegModule) on
real MRML from the slicer-core wheel. The in-Slicer self-test is TransferSegTest in
TransferSeg/TransferSeg.py."""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import py_compile
import re
import struct
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

ROOT = Path(__file__).resolve().parents[1]
MODULE_DIR = ROOT / "TransferSeg"
MODULE_FILE = MODULE_DIR / "TransferSeg.py"
UI_FILE = MODULE_DIR / "Resources" / "UI" / "TransferSeg.ui"
sys.path.insert(0, str(MODULE_DIR))

from TransferSegModule import (  # noqa: E402
    annotation,
    catalog,
    dependencies,
    environment,
    jobstate,
    matching,
)

# The fields and types of Slicer's ExtensionsIndex catalog entry schema
# (Schemas/slicer-extension-catalog-entry-schema-v1.0.1.json in the Slicer repository).
CATALOG_ENTRY_SCHEMA = {
    "$schema": "http://json-schema.org/draft-07/schema",
    "type": "object",
    "required": ["$schema", "category", "scm_url"],
    "additionalProperties": False,
    "properties": {
        "$schema": {"type": "string"},
        "category": {"type": "string"},
        "scm_url": {"type": "string"},
        "scm_revision": {"type": "string"},
        "scm_type": {"type": "string", "enum": ["git", "local"]},
        "build_dependencies": {"type": "array", "items": {"type": "string"}},
        "build_subdirectory": {"type": "string"},
        "enabled": {"type": "boolean"},
        "tier": {"type": "integer", "enum": [1, 3, 5]},
    },
}
SCHEMA_URL = ("https://raw.githubusercontent.com/Slicer/Slicer/main/Schemas/"
              "slicer-extension-catalog-entry-schema-v1.0.1.json")
JSON_TYPES = {"string": str, "array": list, "boolean": bool, "integer": int, "object": dict}


def check_by_hand(entry: object, schema: dict = CATALOG_ENTRY_SCHEMA) -> list[str]:
    """What is wrong with ``entry`` by the (flat) schema above, each as "field: problem"."""
    if not isinstance(entry, dict):
        return ["entry: not an object"]
    errors = [f"{key}: required" for key in schema["required"] if key not in entry]
    for key, value in entry.items():
        rule = schema["properties"].get(key)
        if rule is None:
            errors.append(f"{key}: not allowed (additional property)")
            continue
        kind = JSON_TYPES[rule["type"]]
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            errors.append(f"{key}: not of type {rule['type']}")
        elif "enum" in rule and value not in rule["enum"]:
            errors.append(f"{key}: {value!r} is not one of {rule['enum']}")
        elif rule["type"] == "array" and not all(isinstance(v, str) for v in value):
            errors.append(f"{key}: holds a non-string")
    return errors


def schema_errors(entry: object) -> list[str]:
    """Validation errors by jsonschema where it is installed, else by hand."""
    try:
        import jsonschema
    except ImportError:
        return check_by_hand(entry)
    validator = jsonschema.Draft7Validator(CATALOG_ENTRY_SCHEMA)
    return [f"{'/'.join(map(str, e.absolute_path)) or 'entry'}: {e.message}"
            for e in validator.iter_errors(entry)]


def cmake_value(text: str, name: str) -> list[str]:
    """The value of ``set(NAME ...)`` in CMake text, as a list of its (unquoted) items."""
    match = re.search(rf"set\(\s*{name}\s+(.*?)\)", text, re.S)
    assert match, f"no set({name} ...)"
    value = re.sub(r"#[^\n]*", "", match.group(1))
    return [item.strip('"') for item in re.findall(r'"[^"]*"|\S+', value)]


def top_cmake() -> str:
    return (ROOT / "CMakeLists.txt").read_text(encoding="utf-8")


# --- the catalog entry and the CMake lists ------------------------------------------------------

def test_catalog_entry_validates_against_the_extensions_index_schema():
    entry = json.loads((ROOT / "TransferSeg.json").read_text(encoding="utf-8"))
    assert schema_errors(entry) == check_by_hand(entry) == []
    assert entry["$schema"] == SCHEMA_URL
    assert entry["build_subdirectory"] == "."
    assert entry["scm_revision"] == "main"


@pytest.mark.parametrize("bad, why", [
    ({"$schema": SCHEMA_URL, "category": "Segmentation"}, "scm_url"),
    ({"$schema": SCHEMA_URL, "category": "S", "scm_url": "u", "tier": 2}, "tier"),
    ({"$schema": SCHEMA_URL, "category": "S", "scm_url": "u", "homepage": "h"}, "homepage"),
    ({"$schema": SCHEMA_URL, "category": "S", "scm_url": "u", "build_dependencies": "PyTorch"},
     "build_dependencies"),
])
def test_schema_checks_reject_a_bad_entry(bad, why):
    for errors in (check_by_hand(bad), schema_errors(bad)):
        assert errors and any(why in error for error in errors), errors


def test_catalog_entry_agrees_with_the_cmake_metadata():
    entry, text = json.loads((ROOT / "TransferSeg.json").read_text(encoding="utf-8")), top_cmake()
    depends = cmake_value(text, "EXTENSION_DEPENDS")
    assert entry["build_dependencies"] == ([] if depends == ["NA"] else depends) == ["PyTorch"]
    assert cmake_value(text, "EXTENSION_CATEGORY") == [entry["category"]]
    homepage = cmake_value(text, "EXTENSION_HOMEPAGE")[0]
    assert entry["scm_url"].removesuffix(".git") == homepage
    assert "project(TransferSeg)" in text and "add_subdirectory(TransferSeg)" in text
    raw = homepage.replace("github.com", "raw.githubusercontent.com") + "/main/"
    # The ExtensionsIndex checker reads these with its own patterns and downloads each URL:
    # every one must name a PNG that this repository holds.
    icon = re.findall(r'set\s*\(EXTENSION_ICONURL\s*"([^"]+)"[ ]*\)', text)
    shots = re.findall(r'set\s*\(EXTENSION_SCREENSHOTURLS\s*"([^"]+)"\)', text)
    urls = icon + shots[0].split()
    assert len(icon) == 1 and len(urls) >= 3
    for url in urls:
        assert url.startswith(raw), url
        file = ROOT / url[len(raw):]
        assert file.is_file() and file.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", url
    assert "cmake_minimum_required(VERSION 3.20.6...3.22.6 FATAL_ERROR)" in text  # template's
    for line in ("find_package(Slicer REQUIRED)", "include(${Slicer_USE_FILE})",
                 "include(${Slicer_EXTENSION_GENERATE_CONFIG})",
                 "include(${Slicer_EXTENSION_CPACK})"):
        assert line in text


def test_cmake_installs_every_library_file_and_the_catalog():
    listed = cmake_value(top_cmake(), "TRANSFERSEGLIB_PYTHON_SCRIPTS")
    present = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "TransferSegLib").rglob("*.py")
                     if "__pycache__" not in p.parts)
    assert sorted(listed) == present, (
        f"add to CMakeLists.txt: {sorted(set(present) - set(listed))}; "
        f"remove: {sorted(set(listed) - set(present))}")
    resources = cmake_value(top_cmake(), "TRANSFERSEGLIB_PYTHON_RESOURCES")
    shipped = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "Resources" / "Models")
                     .iterdir())  # the shipped CT base and its model card
    assert resources == ["Resources/models.json", "Resources/models.schema.json", *shipped]
    assert all((ROOT / r).is_file() for r in resources)
    assert "ctkMacroCompilePythonScript(" in top_cmake()


def test_module_cmake_lists_its_scripts_and_resources():
    text = (MODULE_DIR / "CMakeLists.txt").read_text(encoding="utf-8")
    text = text.replace("${MODULE_NAME}", "TransferSeg")
    scripts = cmake_value(text, "MODULE_PYTHON_SCRIPTS")
    present = sorted(p.relative_to(MODULE_DIR).as_posix() for p in MODULE_DIR.rglob("*.py")
                     if "__pycache__" not in p.parts)
    assert sorted(scripts) == present
    resources = cmake_value(text, "MODULE_PYTHON_RESOURCES")
    assert all((MODULE_DIR / r).is_file() for r in resources)
    assert {"Resources/UI/TransferSeg.ui", "Resources/requirements.txt",
            "Resources/Icons/TransferSeg.png"} <= set(resources)
    assert "slicerMacroBuildScriptedModule(" in text and "WITH_GENERIC_TESTS" in text
    assert "slicer_add_python_unittest(SCRIPT TransferSeg.py)" in text


def test_only_the_module_file_lies_at_the_top_of_the_module_folder():
    # Slicer loads every top-level .py file of a scripted-module folder as a module.
    assert [p.name for p in MODULE_DIR.glob("*.py")] == ["TransferSeg.py"]


# --- the module file and its panel ------------------------------------------------------------

@pytest.mark.parametrize("path", [MODULE_FILE, *sorted((MODULE_DIR / "TransferSegModule").glob(
    "*.py")), ROOT / "Resources" / "Icons" / "draw_icon.py"], ids=lambda p: p.name)
def test_python_files_compile(path, tmp_path):
    py_compile.compile(str(path), cfile=str(tmp_path / "compiled.pyc"), doraise=True)


def module_tree() -> ast.Module:
    return ast.parse(MODULE_FILE.read_text(encoding="utf-8"))


def class_node(name: str) -> ast.ClassDef:
    return next(n for n in ast.walk(module_tree()) if isinstance(n, ast.ClassDef)
                and n.name == name)


def annotated_fields(name: str) -> dict[str, str]:
    return {n.target.id: ast.unparse(n.annotation) for n in class_node(name).body
            if isinstance(n, ast.AnnAssign)}


def ui_widgets() -> dict[str, ET.Element]:
    return {w.get("name"): w for w in ET.parse(UI_FILE).getroot().iter("widget")}


def test_ui_has_every_widget_the_module_uses():
    source = MODULE_FILE.read_text(encoding="utf-8")
    used = set(re.findall(r"\bui\.([A-Za-z_]\w*)", source))
    assert len(used) > 30
    missing = sorted(used - set(ui_widgets()))
    assert not missing, f"not in TransferSeg.ui: {missing}"


def test_ui_sections_and_custom_widgets():
    root = ET.parse(UI_FILE).getroot()
    widgets = ui_widgets()
    sections = [w.find("property[@name='text']/string").text for w in widgets.values()
                if w.get("class") == "ctkCollapsibleButton"]
    assert sections == ["Base model", "Training data", "Fine-tune", "Segment", "Evaluate",
                        "Annotate loop"]
    declared = {c.findtext("class") for c in root.iter("customwidget")}
    qt_classes = {"QLabel", "QPushButton", "QLineEdit", "QListWidget", "QTextBrowser",
                  "QTableWidget", "QComboBox", "QSpinBox", "QDoubleSpinBox", "QProgressBar",
                  "QFrame", "QPlainTextEdit"}
    assert {w.get("class") for w in widgets.values()} <= qt_classes | declared
    assert widgets["logText"].find("property[@name='maximumBlockCount']/number").text == "2000"


def test_ui_binds_parameters_to_widgets_that_can_hold_them():
    fields = annotated_fields("TransferSegParameterNode")
    holders = {"str": {"QLineEdit", "QLabel", "QComboBox"}, "int": {"QSpinBox"},
               "float": {"QDoubleSpinBox"}, "vtkMRML": {"qMRMLNodeComboBox"}}
    bound = {}
    for name, widget in ui_widgets().items():
        value = widget.find("property[@name='SlicerParameterName']")
        if value is None:
            continue
        assert value.get("stdset") == "0"  # a dynamic property, as Qt Designer writes it
        parameter = value.find("string").text
        assert parameter in fields, f"{name} is bound to unknown parameter {parameter}"
        kind = fields[parameter]
        kind = "vtkMRML" if kind.startswith("vtkMRML") else kind.split("[")[-1].split(",")[0]
        assert widget.get("class") in holders[kind], (name, parameter, fields[parameter])
        bound[parameter] = name
    assert {"strategy", "steps", "learningRate", "device", "inputVolume", "reference",
            "prediction", "nextVolume", "trainingVolume", "trainingSegmentation"} <= set(bound)


def test_ui_gives_every_mrml_widget_the_scene():
    root = ET.parse(UI_FILE).getroot()
    mrml = {n for n, w in ui_widgets().items() if w.get("class", "").startswith("qMRML")
            and n != "TransferSeg"}
    connected = {c.findtext("receiver") for c in root.iter("connection")
                 if c.findtext("signal") == "mrmlSceneChanged(vtkMRMLScene*)"}
    assert mrml and mrml == connected


def test_module_uses_only_what_exists():
    """Attributes the module file reads from the parameter node, the logic and the package
    modules exist (the module cannot be imported here: it needs the Slicer application)."""
    from TransferSegModule import scene

    tree = module_tree()
    fields = set(annotated_fields("TransferSegParameterNode"))
    logic_source = ast.parse((MODULE_DIR / "TransferSegModule" / "logic.py").read_text(
        encoding="utf-8"))
    logics = [class_node("TransferSegLogic"), next(
        n for n in logic_source.body if isinstance(n, ast.ClassDef) and n.name == "Logic")]
    logic_names = {n.name for logic in logics for n in logic.body
                   if isinstance(n, ast.FunctionDef)}
    logic_names |= {t.attr for logic in logics for n in ast.walk(logic)
                    if isinstance(n, ast.Assign) for t in ast.walk(n)
                    if isinstance(t, ast.Attribute)}
    modules = {"scene": scene, "dependencies": dependencies, "catalog": catalog,
               "environment": environment, "jobstate": jobstate, "matching": matching}
    for node in ast.walk(tree):
        if not isinstance(node, ast.Attribute):
            continue
        owner = ast.unparse(node.value)
        if owner in modules:
            assert hasattr(modules[owner], node.attr), f"{owner}.{node.attr}"
        elif owner in ("p", "self._parameterNode") and not node.attr[0].isupper():
            assert node.attr in fields | {"connectGui", "disconnectGui"}, f"p.{node.attr}"
        elif owner == "self.logic":
            assert node.attr in logic_names, f"self.logic.{node.attr}"
        elif owner == "pair":
            assert node.attr in annotated_fields("TrainingPair"), f"pair.{node.attr}"
    metadata = class_node("TransferSeg")
    text = ast.unparse(metadata)
    for field in ("title", "categories", "contributors", "helpText", "acknowledgementText"):
        assert f"self.parent.{field} =" in text
    assert "['Segmentation']" in text


def run_self_test(problem, missing, sample_missing=False):
    """TransferSegTest.runTest called as Slicer calls it (``ScriptedLoadableModule.runTest``
    makes the test case and calls ``testCase.runTest()`` itself, no unittest runner, so a
    ``skipTest`` there is an exception: "Reload and Test failed"), with stand-ins for the
    dependency checks. Returns what it displayed and which tests it ran."""
    import types

    test = class_node("TransferSegTest")
    shown, ran = [], []
    namespace = {
        "dependencies": types.SimpleNamespace(unsupported=lambda: problem),
        "TransferSegLogic": lambda: types.SimpleNamespace(missingDependencies=lambda: missing),
    }
    function = next(n for n in test.body if isinstance(n, ast.FunctionDef) and n.name == "runTest")
    exec(compile(ast.Module([function], []), "TransferSeg.py", "exec"), namespace)
    case = types.SimpleNamespace(
        delayDisplay=shown.append, setUp=lambda: None, skipTest=None,
        test_synthetic=lambda: ran.append("synthetic"),
        test_real_sample=lambda: ran.append("real"))
    namespace["runTest"](case)
    return shown, ran


def test_the_self_test_reports_what_is_missing_and_passes_as_skipped():
    shown, ran = run_self_test(None, ["torch", "monai"])
    assert ran == [] and shown == ["TransferSeg self-test skipped: install torch, monai first "
                                   "(any TransferSeg button offers to)"]
    shown, ran = run_self_test("TransferSeg needs Slicer 5.10 or newer", [])
    assert ran == [] and "needs Slicer 5.10" in shown[0]
    shown, ran = run_self_test(None, [])
    assert ran == ["synthetic", "real"] and shown == []
    # Nothing in the module's test raises a skip, and torch is imported only after the check.
    source = ast.unparse(class_node("TransferSegTest"))
    assert "skipTest" not in source
    run = ast.unparse(next(n for n in class_node("TransferSegTest").body
                           if isinstance(n, ast.FunctionDef) and n.name == "runTest"))
    assert "import torch" not in run and run.index("missingDependencies") < run.index("test_")


def test_the_module_uses_the_librarys_strategies_and_devices():
    from TransferSegLib import strategies

    module = ast.unparse(module_tree())  # the parameter node's choices come from the library
    assert "from TransferSegLib.strategies import DEFAULT_BASE, DEFAULT_STRATEGY, STRATEGIES" \
        in module
    assert "Choice(list(STRATEGIES))" in module and strategies.STRATEGIES[0] == "scratch"
    assert "Default(DEFAULT_BASE)" in module  # the shipped CT base is offered first
    # the library's default strategy, as the command line and the jobs have it
    assert "Default(DEFAULT_STRATEGY)" in module
    assert strategies.DEFAULT_STRATEGY in strategies.STRATEGIES
    assert environment.DEVICES == ("auto", "cuda", "cpu")


# --- icon and requirements --------------------------------------------------------------------

@pytest.mark.parametrize("path", [ROOT / "Resources" / "Icons" / "TransferSeg.png",
                                  MODULE_DIR / "Resources" / "Icons" / "TransferSeg.png"])
def test_icon_is_a_128_pixel_png(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    assert struct.unpack(">II", data[16:24]) == (128, 128)
    pixels = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
    assert pixels.shape[:2] == (128, 128) and pixels.std() > 10  # a drawing, not a blank


def test_requirements_leave_core_packages_alone_and_cap_every_range():
    text = (MODULE_DIR / "Resources" / "requirements.txt").read_text(encoding="utf-8")
    lines = environment.read_requirements(text)
    assert lines and not {environment.requirement_name(line) for line in lines} & set(
        environment.CORE_PACKAGES)
    for line in lines:
        assert re.search(r"<\s*[\d.]+", line), f"no upper bound: {line}"
    pyproject = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    block = re.search(r"^dependencies = \[(.*?)^\]", pyproject,
                      re.S | re.M).group(1)
    declared = re.findall(r'^\s*"([^"]+)"', block, re.M)
    assert "torch>=2.1,<3" in declared
    expected = {environment.requirement_name(d): d.replace(" ", "") for d in declared
                if environment.requirement_name(d) not in environment.CORE_PACKAGES}
    assert {environment.requirement_name(line): line.replace(" ", "") for line in lines} == expected


def test_monai_is_narrowed_to_the_releases_that_support_the_installed_torch():
    # Each MONAI release's own torch floor (Requires-Dist): 1.6.0 torch>=2.8.0,
    # 1.5.1 torch>=2.4.1, 1.4.0 torch>=1.9.
    assert environment.monai_requirement("2.13.0") == "monai>=1.5.1,<1.7"
    assert environment.monai_requirement("2.8.0+cu128") == "monai>=1.5.1,<1.7"
    assert environment.monai_requirement("2.7.1+cu118") == "monai>=1.5.1,<1.6"
    assert environment.monai_requirement("2.4.1") == "monai>=1.5.1,<1.6"
    assert environment.monai_requirement("2.4.0") == "monai>=1.3,<1.5"
    with pytest.raises(ValueError, match="PyTorch 2.1 or newer.*2.0.1 is installed"):
        environment.monai_requirement("2.0.1")
    lines = environment.read_requirements(dependencies.REQUIREMENTS.read_text(encoding="utf-8"))
    narrowed = environment.install_requirements(lines, {"torch": "2.5.1+cu121", "numpy": "2.1.0"})
    assert "monai>=1.5.1,<1.6" in narrowed and len(narrowed) == len(lines)
    assert [line for line in narrowed if not line.startswith("monai")] == [
        line for line in lines if not line.startswith("monai")]
    with pytest.raises(ValueError, match="install it with the PyTorch extension"):
        environment.install_requirements(lines, {"numpy": "2.1.0"})
    assert environment.version_tuple("2.5.1+cu121") == (2, 5, 1)
    assert environment.version_tuple("x") == ()


def fake_slicer(tmp_path, pydeps: bool):
    """``slicer`` as the module's installer sees it: ``app.temporaryPath``,
    ``util.pip_install``, and on 5.11+ ``slicer.pydeps`` with ``pip_ensure`` and
    ``load_requirements`` (the signatures of Slicer's Base/Python/slicer/pydeps.py)."""
    import types

    calls = []
    slicer = types.ModuleType("slicer")
    slicer.app = types.SimpleNamespace(temporaryPath=str(tmp_path))
    slicer.util = types.SimpleNamespace(pip_install=lambda args: calls.append(("pip", args)))
    modules = {"slicer": slicer}
    if pydeps:
        module = types.ModuleType("slicer.pydeps")

        def pip_ensure(requirements, constraints=None, skip_packages=None, prompt_install=True,
                       prompt_restart=True, requester=None, skip_in_testing=True,
                       show_progress=True):
            calls.append(("ensure", requirements, constraints, prompt_install, requester))

        module.pip_ensure = pip_ensure
        module.load_requirements = lambda path: environment.read_requirements(
            Path(path).read_text(encoding="utf-8"))
        slicer.pydeps = module
        modules["slicer.pydeps"] = module
    return modules, calls


@pytest.mark.parametrize("pydeps", [True, False], ids=["slicer 5.11+", "slicer 5.10"])
def test_install_constrains_the_core_packages_and_asks_nothing_itself(tmp_path, monkeypatch,
                                                                      pydeps):
    modules, calls = fake_slicer(tmp_path, pydeps)
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    if not pydeps:
        monkeypatch.delitem(sys.modules, "slicer.pydeps", raising=False)
    dependencies.install()
    installed = dependencies.installed_core_versions()
    pins = (tmp_path / "TransferSeg-constraints.txt").read_text(encoding="utf-8")
    assert pins == environment.constraints(installed) and f"torch=={installed['torch']}" in pins
    wanted = environment.read_requirements(
        (tmp_path / "TransferSeg-requirements.txt").read_text(encoding="utf-8"))
    assert environment.monai_requirement(installed["torch"]) in wanted
    if pydeps:
        assert calls == [("ensure", wanted, str(tmp_path / "TransferSeg-constraints.txt"),
                          False, "TransferSeg")]
    else:
        assert calls == [("pip", ["-r", str(tmp_path / "TransferSeg-requirements.txt"),
                                  "-c", str(tmp_path / "TransferSeg-constraints.txt")])]


def test_weights_that_need_onnx_or_h5py_ask_for_them_with_the_projects_ranges(
        tmp_path, monkeypatch):
    pyproject = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    extra = re.search(r"^import = \[(.*?)\]", pyproject, re.M).group(1)
    assert sorted(environment.IMPORT_PACKAGES.values()) == sorted(re.findall(r'"([^"]+)"', extra))
    assert environment.import_requirements(["model_v1.onnx", "unet3d_Isomulti1v810.h5", "x.pth",
                                      "other.ONNX"]) == ["onnx>=1.14,<2", "h5py>=3.8,<4"]
    assert dependencies.missing_for_import(["model_v1.onnx"]) == []  # installed here
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "onnx" else real(name, *a))
    assert dependencies.missing_for_import(["model_v1.onnx", "a.h5"]) == ["onnx>=1.14,<2"]
    modules, calls = fake_slicer(tmp_path, pydeps=True)
    for name, module in modules.items():
        monkeypatch.setitem(sys.modules, name, module)
    dependencies.install_packages(["onnx>=1.14,<2"])
    assert calls == [("ensure", ["onnx>=1.14,<2"], str(tmp_path / "TransferSeg-constraints.txt"),
                      False, "TransferSeg")]


def test_the_module_loads_on_an_old_slicer_to_say_it_is_too_old():
    """On Slicer 5.8 (Python 3.9) the module must load far enough to show its one message:
    every file it imports at load time parses as Python 3.9 and defers its annotations (an
    ``X | None`` evaluated at import is a TypeError on 3.9; checked by hand with a real 3.9)."""
    loaded = [MODULE_DIR / "TransferSeg.py", *sorted((MODULE_DIR / "TransferSegModule").glob(
        "*.py")), *(ROOT / "TransferSegLib" / f"{n}.py" for n in ("names", "strategies",
                                                                  "errors", "__init__"))]
    for path in loaded:
        source = path.read_text(encoding="utf-8")
        tree = ast.parse(source, str(path), feature_version=(3, 9))
        if "from __future__ import annotations" in source:
            continue
        annotations = [n.annotation for n in ast.walk(tree)
                       if isinstance(n, (ast.arg, ast.AnnAssign)) and n.annotation is not None]
        annotations += [n.returns for n in ast.walk(tree)
                        if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)) and n.returns]
        union = [ast.unparse(a) for a in annotations for b in ast.walk(a)
                 if isinstance(b, ast.BinOp) and isinstance(b.op, ast.BitOr)]
        assert not union, f"{path.name}: {union[0]} is evaluated at import"


def test_an_old_slicer_gets_one_message(monkeypatch):
    assert dependencies.unsupported() is None
    monkeypatch.setattr(sys, "version_info", (3, 9, 10, "final", 0))
    message = dependencies.unsupported()
    assert "Slicer 5.10 or newer" in message and "Python 3.9" in message
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "Supported: Slicer 5.10 and newer" in text
    assert 'VERSION_LESS "5.10"' in top_cmake()
    description = re.search(r'set\(EXTENSION_DESCRIPTION "([^"]*)"', top_cmake()).group(1)
    assert "Needs Slicer 5.10 or newer." in description


def test_requirement_helpers():
    assert environment.requirement_name("SimpleITK>=2.3,<3") == "simpleitk"
    assert environment.requirement_name("monai[nibabel] >=1.3  # comment") == "monai"
    assert environment.requirement_name("# only a comment") == ""
    assert environment.read_requirements("# head\nmonai>=1.3,<1.7  # why\n\neinops<1\n") == [
        "monai>=1.3,<1.7", "einops<1"]
    pins = environment.constraints({"numpy": "1.26.4", "SimpleITK": "2.3.1", "torch": "2.5.0",
                              "monai": "1.4.0"})
    assert pins == "SimpleITK==2.3.1\nnumpy==1.26.4\ntorch==2.5.0\n"


# --- segment names -> model labels ------------------------------------------------------------

MODEL = {0: "background", 1: "liver", 2: "left kidney", 3: "spleen"}


def test_segments_match_model_labels_by_name():
    mapping = matching.match_segments(["Liver", "Left_kidney", "tumour", "Background"], MODEL)
    assert mapping == {"Liver": "liver", "Left_kidney": "left kidney", "tumour": "tumour",
                       "Background": matching.IGNORE}
    assert matching.unmatched(mapping, MODEL) == ["tumour"]


def test_training_labels_keep_the_model_order_then_new_ones():
    mapping = {"tumour": "tumour", "Spleen": "spleen", "Liver": "liver", "fat": matching.IGNORE}
    labels = matching.training_labels(mapping, MODEL)
    assert labels == {0: "background", 1: "liver", 2: "spleen", 3: "tumour"}
    assert matching.training_labels({"x": matching.IGNORE}, MODEL) == {0: "background"}


def test_relabel_maps_segment_values_to_training_values():
    labels = {0: "background", 1: "liver", 2: "tumour"}
    lookup = matching.relabel({1: "tumour", 2: "Liver", 3: "fat"},
                           {"tumour": "tumour", "Liver": "liver", "fat": matching.IGNORE}, labels)
    assert lookup == {1: 2, 2: 1, 3: 0}
    array = np.array([[0, 1, 2], [3, 2, 1]], dtype=np.uint8)
    out = matching.relabel_array(array, lookup)
    assert out.tolist() == [[0, 2, 1], [0, 1, 2]] and out.dtype == np.uint16
    assert matching.relabel_array(np.array([[5]]), {}).tolist() == [[0]]  # unmapped -> background


def test_name_matching_between_label_maps():
    assert matching.match_by_name({1: "Liver", 2: "tumour"}, {4: "liver", 7: "spleen"}) == {
        1: 4, 2: 0}
    assert matching.shared_labels({1: "Liver"}, {0: "background", 4: "liver", 7: "spleen"}) == {
        4: "liver"}
    assert matching.catalog_labels({"1": "liver", "2": "spleen"}) == {
        0: "background", 1: "liver", 2: "spleen"}
    assert matching.catalog_labels(["brain"]) == {0: "background", 1: "brain"}
    assert matching.catalog_labels({"0": "bg", "1": "x"}) == {0: "bg", 1: "x"}


def test_names_for_files_and_models():
    taken: set[str] = set()
    assert [matching.unique_name(n, taken) for n in ("CT 1/2", "CT 1/2", "", "..")] == [
        "CT_1_2", "CT_1_2-2", "case", "case-2"]
    assert matching.fine_tuned_id("liver-ct", "finetune", ["liver-ct-finetune-1"]) == \
        "liver-ct-finetune-2"
    assert matching.fine_tuned_id("", "scratch", []) == "new-scratch-1"
    assert matching.fine_tuned_id("liver-ct-finetune-2", "two-stage", ["liver-ct-two-stage-1"]) == \
        "liver-ct-two-stage-2"


# --- colours ----------------------------------------------------------------------------------

def test_dice_colour_runs_from_red_to_green():
    red, amber, green = (jobstate.dice_colour(d) for d in (0.0, 0.5, 1.0))
    assert red[0] > 150 and red[1] < 60
    assert green[1] > 150 and green[0] < 60
    assert amber[0] > 150 and amber[1] > 150 and amber[2] < 80  # yellow-ish halfway
    greens = [jobstate.dice_colour(d / 10)[1] for d in range(6)]
    assert greens == sorted(greens)
    assert jobstate.dice_colour(-1) == red and jobstate.dice_colour(2) == green
    assert jobstate.dice_colour(None) == jobstate.dice_colour(float("nan")) == (160, 160, 160)
    assert jobstate.progress_bar_style((255, 0, 16)) == \
        "QProgressBar::chunk { background-color: #ff0010; }"


# --- job events -> panel state ----------------------------------------------------------------

def test_monitor_follows_a_training_job():
    monitor = jobstate.JobMonitor(log_limit=100)
    assert monitor.button_text == "Start" and not monitor.active
    monitor.start(steps=100)
    assert monitor.button_text == "Cancel" and monitor.percent == 0
    lines = monitor.update([
        {"event": "start", "device": "cpu", "steps": 100, "from_step": 0, "report": "reused 2"},
        {"event": "message", "message": "fewer than 3 labelled cases"},
        {"event": "step", "step": 10, "steps": 100, "loss": 1.5, "lr": 1e-3, "eta_s": 90},
        {"event": "step", "step": 50, "steps": 100, "loss": 0.5, "lr": 1e-3, "eta_s": 65.2},
        {"event": "validation", "step": 50, "dice": 0.61, "labels": {"liver": 0.61}},
        {"event": "checkpoint", "step": 50, "path": "state.safetensors"},
        {"event": "stage", "step": 60, "stage": 2, "message": "all layers unfrozen"},
        {"event": "log", "text": "a warning", "stream": "stderr"},
    ])
    assert lines == ["started on cpu\nreused 2", "fewer than 3 labelled cases",
                     "step 50: validation Dice 0.610 (liver 0.610)", "all layers unfrozen",
                     "a warning"]
    assert monitor.percent == 50 and monitor.stage == 2
    assert monitor.losses == [(10, 1.5), (50, 0.5)] and monitor.dices == [(50, 0.61)]
    assert monitor.per_label == {"liver": 0.61}
    assert monitor.status == "step 50 / 100, about 1 min 05 s left"
    monitor.update([{"event": "validation", "step": 100, "dice": 0.7, "per_label": {"a": 0.7}},
                    {"event": "done", "status": "done", "model": "/m.safetensors", "step": 100,
                     "best_dice": 0.7, "seconds": 3725}])
    assert monitor.state == jobstate.DONE and monitor.percent == 100 and not monitor.active
    assert monitor.model == "/m.safetensors" and monitor.best_dice == 0.7
    assert monitor.log[-1] == "done in 1 h 02 min"
    assert monitor.status == "done; best validation Dice 0.700"
    assert monitor.finish(0) == []  # already over


def test_monitor_cancel_error_and_crash():
    monitor = jobstate.JobMonitor()
    monitor.start(10)
    monitor.request_cancel()
    assert monitor.state == jobstate.CANCELLING and monitor.button_text == "Cancelling..."
    monitor.update([{"event": "cancelled", "model": "/last.safetensors"}])
    assert monitor.state == jobstate.CANCELLED and monitor.model == "/last.safetensors"

    monitor.start(10)
    monitor.update([{"event": "error", "message": "The GPU ran out of memory; use cpu."}])
    assert monitor.state == jobstate.FAILED and monitor.status.startswith("failed: The GPU")

    monitor.start(10)
    lines = monitor.finish(-9, "Traceback\nMemoryError")
    assert monitor.state == jobstate.FAILED and "exit status -9" in lines[0]
    assert lines[0].endswith("MemoryError")
    monitor.start(10)
    monitor.request_cancel()
    monitor.finish(-15)
    assert monitor.state == jobstate.CANCELLED


def test_monitor_keeps_a_capped_log_and_download_progress():
    monitor = jobstate.JobMonitor(log_limit=3)
    monitor.start()
    monitor.update([{"event": "log", "text": f"line {i}"} for i in range(5)])
    assert list(monitor.log) == ["line 2", "line 3", "line 4"]
    monitor.update([{"event": "progress", "done": 25, "total": 100}])
    assert monitor.percent == 25
    monitor.update([{"event": "progress", "done": 5, "total": None}])
    assert monitor.percent == 0


def test_segmentation_job_outputs_in_case_order():
    monitor = jobstate.JobMonitor("segment")
    monitor.start()
    monitor.update([{"event": "case", "case": "b", "message": "segmenting b"},
                    {"event": "segmented", "case": "b", "path": "/out/b.seg.nrrd"},
                    {"event": "segmented", "case": "a", "path": "/out/a.seg.nrrd"},
                    {"event": "done", "outputs": ["/out/a.seg.nrrd", "/out/b.seg.nrrd"]}])
    assert jobstate.job_outputs(monitor, ["a", "b"]) == ["/out/a.seg.nrrd", "/out/b.seg.nrrd"]
    monitor.outputs.clear()
    assert jobstate.job_outputs(monitor, ["a", "b"]) == ["/out/a.seg.nrrd", "/out/b.seg.nrrd"]
    with pytest.raises(ValueError, match="output files"):
        jobstate.job_outputs(monitor, ["a"])


def test_the_panel_shows_what_a_job_costs():
    monitor = jobstate.JobMonitor("segment")
    monitor.start()
    lines = monitor.update([{"event": "segmented", "case": "a", "path": "/a.seg.nrrd",
                             "seconds": 3.21, "gpu_peak_gb": 2.5},
                            {"event": "segmented", "case": "b", "path": "/b.seg.nrrd",
                             "seconds": 1.0, "gpu_peak_gb": 1.5,
                             "summary": "liver 4.0 mL; NOT FOUND: stomach"},
                            {"event": "done"}])
    assert lines[:2] == ["segmented a (3.2 s, GPU peak 2.5 GB)",
                         "segmented b (1.0 s, GPU peak 1.5 GB): liver 4.0 mL; NOT FOUND: stomach"]
    assert monitor.gpu_peak_gb == 2.5 and monitor.status == "done, GPU peak 2.5 GB"
    training = jobstate.JobMonitor("finetune")
    training.start(100)
    training.update([{"event": "step", "step": 10, "steps": 100, "loss": 1.0,
                      "cpu_peak_rss_gb": 1.2}])
    assert training.status == "step 10 / 100" and training.gpu_peak_gb is None  # CPU run


# --- the annotate loop ------------------------------------------------------------------------

def test_rounds_show_forgetting():
    rounds = annotation.RoundHistory()
    assert rounds.current == 0
    assert rounds.begin("base", []) == 1
    rounds.record(1, "val 1", 0.80)
    rounds.record(1, "new 1", 0.50)
    assert rounds.begin("ft-1", ["new 1"]) == 2
    rounds.record(2, "val 1", 0.70)
    rounds.record(2, "new 2", 0.75)
    header, rows = rounds.table()
    assert header == ["case", "round 1", "round 2", "change"]
    assert rows[0][:3] == ["val 1", 0.80, 0.70] and rows[0][3] == pytest.approx(-0.10)
    assert rows[1] == ["new 1", 0.50, None, None]
    assert rows[2] == ["new 2", None, 0.75, None]
    assert rounds.forgetting() == {"val 1": (0.80, 0.70)}
    assert rounds.forgetting(tolerance=0.2) == {}
    with pytest.raises(ValueError, match="round 3"):
        rounds.record(3, "x", 0.5)


def test_score_rows_end_with_the_mean():
    scores = [{"name": "liver", "present": True, "dice": 0.9, "hd95_mm": 3.0,
               "volume_pred_ml": 1500.0, "volume_ref_ml": 1450.0},
              {"name": "tumour", "present": False, "dice": 0.0, "hd95_mm": float("inf"),
               "volume_pred_ml": 2.0, "volume_ref_ml": 0.0}]
    header, rows = annotation.score_rows(scores, {"labels": 1, "dice": 0.9, "hd95_mm": 3.0})
    assert header[:2] == ["segment", "Dice"]
    assert rows[1][0] == "tumour (not in reference)"
    assert rows[-1] == ["mean of 1", 0.9, 3.0, None, None]


# --- catalog and computer ---------------------------------------------------------------------

CATALOG = [
    {"id": "liver-ct", "title": "Liver CT", "modality": "CT", "anatomy": "abdomen",
     "task": "organs", "labels": {"1": "liver"}, "licence": "MIT", "cached": True,
     "verified": True, "kind": "published"},
    {"id": "brain-mr", "title": "Brain MR", "modality": "MR", "anatomy": "head",
     "task": "tumour", "labels": {"1": "edema", "2": "enhancing"}, "licence": "CC-BY-4.0",
     "cached": False, "verified": False, "kind": "published"},
    {"id": "mine", "title": "", "modality": "CT", "labels": {"0": "background", "1": "liver"},
     "cached": True, "kind": "fine-tuned"},
]


def test_catalog_search_lines_and_details():
    assert [m["id"] for m in catalog.filter_models(CATALOG, "ct LIVER")] == ["liver-ct", "mine"]
    assert [m["id"] for m in catalog.filter_models(CATALOG, "enhancing")] == ["brain-mr"]
    assert catalog.filter_models(CATALOG, "") == CATALOG
    assert catalog.model_line(CATALOG[0]) == "Liver CT  [CT]"
    assert catalog.model_line(CATALOG[1]) == "Brain MR  [MR, not downloaded]"
    assert catalog.model_line(CATALOG[2]) == "mine  [CT, fine-tuned]"
    html = catalog.model_details(CATALOG[1])
    for text in ("<h3>Brain MR</h3>", "2: edema, enhancing", "CC-BY-4.0", "no (fetch it first)"):
        assert text in html
    assert "1: liver" in catalog.model_details(CATALOG[2])  # background not listed
    assert "&lt;b&gt;" in catalog.model_details({"id": "<b>"})


def test_gpu_lines():
    text = "NVIDIA H100 80GB HBM3, 81559\nbad line\nNVIDIA A10, 23028\n"
    gpus = environment.parse_nvidia_smi(text)
    assert [name for name, _ in gpus] == ["NVIDIA H100 80GB HBM3", "NVIDIA A10"]
    assert gpus[0][1] == pytest.approx(79.65, abs=0.01)
    assert environment.gpu_description(gpus) == "GPU: NVIDIA H100 80GB HBM3, 79.6 GiB (+1 more)"
    assert environment.gpu_description([]).startswith("No NVIDIA GPU found")
    assert isinstance(dependencies.gpus(), list)


def test_job_python_prefers_python_slicer():
    slicer_app = os.path.join("opt", "Slicer", "bin", "SlicerApp-real")
    beside = os.path.join("opt", "Slicer", "bin", "PythonSlicer")
    assert environment.job_python(beside, lambda _: None) == beside
    assert environment.job_python(slicer_app, lambda _: None,
                                  exists=lambda p: p == beside) == beside
    assert environment.job_python(slicer_app, lambda n: f"/path/{n}", exists=lambda _: False) == \
        "/path/PythonSlicer"
    assert environment.job_python(sys.executable, lambda _: None, lambda _: False) == sys.executable


def test_job_environment_puts_the_library_first():
    from TransferSegLib.process import child_environment

    env = child_environment({"PYTHONPATH": os.pathsep.join(["/a", str(ROOT)]), "X": "1"})
    assert env["PYTHONPATH"].split(os.pathsep) == [str(ROOT), "/a"] and env["X"] == "1"
    assert env["PYTHONUNBUFFERED"] == "1"
    assert dependencies.library_root() == ROOT  # the library the module and its jobs run


def test_dependencies_are_found_in_this_environment(tmp_path, monkeypatch):
    assert dependencies.REQUIREMENTS.is_file()
    assert dependencies.missing() == []
    assert set(dependencies.installed_core_versions()) == {"torch", "SimpleITK", "numpy"}
    monkeypatch.setenv("TRANSFERSEG_HOME", str(tmp_path))
    first, second = dependencies.run_folder("segment"), dependencies.run_folder("segment")
    assert first != second and first.is_dir() and second.is_dir()
    assert first.parent == tmp_path / "slicer-runs"


# --- the scene (real MRML from slicer-core) ---------------------------------------------------

@pytest.fixture()
def mrml_scene():
    slicer = pytest.importorskip("slicer")
    return slicer.vtkMRMLScene()


def test_tables_and_the_training_plot(mrml_scene):
    from TransferSegModule import scene

    table = scene.singleton(mrml_scene, "vtkMRMLTableNode", "rounds", "TransferSeg rounds")
    assert scene.singleton(mrml_scene, "vtkMRMLTableNode", "rounds", "other") is table
    assert table.GetAttribute(scene.ROLE) == "rounds"
    scene.write_table(table, ["case", "round 1"], [["a", 0.5], ["b", None]], text_columns=(0,))
    vtk_table = table.GetTable()
    assert vtk_table.GetNumberOfRows() == 2
    assert vtk_table.GetValueByName(0, "case").ToString() == "a"
    assert vtk_table.GetValueByName(0, "round 1").ToDouble() == 0.5
    assert np.isnan(vtk_table.GetValueByName(1, "round 1").ToDouble())

    chart = scene.training_chart(mrml_scene)
    assert scene.training_chart(mrml_scene) is chart and chart.GetNumberOfPlotSeriesNodes() == 2
    scene.update_plot(mrml_scene, [(10, 1.2), (20, 0.8)], [(20, 0.55)])
    loss = scene.singleton(mrml_scene, "vtkMRMLTableNode", "loss", "")
    assert loss.GetTable().GetNumberOfRows() == 2
    assert loss.GetTable().GetValueByName(1, "loss").ToDouble() == 0.8
    view = scene.plot_view(mrml_scene)
    assert view.GetPlotChartNodeID() == chart.GetID()


def test_training_case_from_nodes_renames_segments(mrml_scene):
    from TransferSegModule import scene

    volume, segmentation = scene.sphere_case(mrml_scene, 0, "CT 1", size=32)
    assert scene.segment_names(segmentation) == ["tumour"] and scene.segment_names(None) == []
    labels = {0: "background", 1: "liver", 2: "lesion"}
    case = scene.training_case(volume, segmentation, {"tumour": "lesion"}, labels, set())
    assert case["name"] == "CT_1"
    label = sitk.GetArrayFromImage(case["label"])
    assert set(np.unique(label)) == {0, 2} and (label == 2).sum() > 100
    assert case["image"].GetSize() == case["label"].GetSize() == (32, 32, 32)
    ignored = scene.training_case(volume, segmentation, {"tumour": matching.IGNORE}, labels, set())
    assert sitk.GetArrayFromImage(ignored["label"]).max() == 0


def test_segmentation_result_and_its_scores(mrml_scene, tmp_path):
    from TransferSegModule import scene

    from TransferSegLib import mrml, segmentations

    volume, truth = scene.sphere_case(mrml_scene, 1, "held out", size=32)
    label, names, _ = mrml.segmentation_to_labelmap(truth, volume)
    output = tmp_path / "held.seg.nrrd"
    segmentations.write_segmentation(
        segmentations.Segmentation.from_label_map(label, {1: "tumour"}), output)
    read, table, colours, _ = scene.read_output(output, {1: "ignored: the file names it"})
    assert table == {1: "tumour"} and set(colours) == {1}
    node = scene.new_segmentation(mrml_scene, read, table, colours, volume, "held out TransferSeg")
    assert node.GetID() != truth.GetID() and scene.segment_names(node) == ["tumour"]

    scores = scene.score_nodes(node, truth, volume)
    assert [s.name for s in scores] == ["tumour"] and scores[0].dice == 1.0
    assert scene.mean_dice(scores) == 1.0
    table_node = mrml_scene.AddNewNodeByClass("vtkMRMLTableNode")
    assert scene.write_scores(table_node, scores).startswith("Mean Dice 1.000 over the 1")
    assert table_node.GetTable().GetValueByName(1, "segment").ToString() == "mean of 1"

    # Only names both have are scored; none in common is an error that says what to do.
    empty = sitk.Image(read.GetSize(), sitk.sitkUInt8)
    empty.CopyInformation(read)
    assert scene.score(empty, {1: "TUMOUR", 2: "liver"}, truth, volume)[0].dice == 0.0
    with pytest.raises(ValueError, match="no segment name in common"):
        scene.score(read, {1: "liver"}, truth, volume)
