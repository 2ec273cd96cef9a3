"""The plugin layer: in-test registration, entry points, validation of hook implementations."""

import json
import re
import subprocess
import sys
from pathlib import Path

import click
import pluggy
import pytest
from click.testing import CliRunner

import contrib_heads
import engine
from engine import hookspecs, plugins, schemas
from engine.cli import cli

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "mrfm-head-brightness"
MANIFEST = EXAMPLE / "mrfm_head_brightness" / "manifest.json"


class EchoHead(engine.Head):
    manifest_path = MANIFEST  # reuse a valid manifest, renamed below

    @classmethod
    def manifest(cls):
        m = json.loads(MANIFEST.read_text())
        return m | {"name": "echo"}

    def predict(self, batch):
        return [{"bright_fraction": 0.5, "cls_norm": 1.0} for _ in batch]


class EchoPlugin:
    @engine.hookimpl
    def register_heads(self, register):
        register(EchoHead)


@pytest.fixture
def registered():
    plugin = EchoPlugin()
    plugins.pm.register(plugin, name="echo-test")
    yield plugin
    plugins.pm.unregister(plugin)


def hook_specs() -> dict[str, object]:
    """Every hook spec the plugin manager knows, from hookspecs.py itself (no hand-kept list)."""
    specs = {name: fn for name, fn in vars(hookspecs).items() if callable(fn) and hasattr(fn, "mrfm_spec")}
    known = {name for name, caller in vars(plugins.pm.hook).items() if getattr(caller, "spec", None) is not None}
    assert specs and set(specs) == known
    return specs


def test_every_hook_has_a_one_line_docstring():
    for name, fn in hook_specs().items():
        doc = (fn.__doc__ or "").strip()
        assert doc and "\n" not in doc, f"hook {name} needs a one-line docstring"


def test_every_hook_is_implemented_by_a_test():
    """A hook nobody implements in a test can break unnoticed (datasette's check, by grep)."""
    sources = "\n".join(p.read_text() for p in Path(__file__).parent.glob("test_*.py"))
    for name in hook_specs():
        assert re.search(rf"\bdef {name}\(", sources), f"no test implements the hook {name}"


def test_a_plugin_registered_in_a_test_provides_a_head(registered):
    heads = plugins.get_head_classes()
    assert heads["echo"].obj is EchoHead and heads["echo"].plugin == "echo-test"
    result = CliRunner().invoke(cli, ["heads"])
    assert result.exit_code == 0 and "echo" in result.output
    shown = CliRunner().invoke(cli, ["heads", "show", "echo"])
    assert shown.exit_code == 0 and '"bright_fraction"' in shown.output


def shipped_heads() -> list[str]:
    """The head packages under contrib_heads/, read from the folders."""
    root = Path(contrib_heads.__file__).parent
    return sorted(p.name for p in root.iterdir() if (p / "__init__.py").is_file())


def test_default_plugins_register_every_shipped_head_with_a_valid_manifest():
    shipped = shipped_heads()
    assert shipped, "no head folders found under contrib_heads/"
    heads = plugins.get_head_classes()
    for name in shipped:
        folder = Path(contrib_heads.__file__).parent / name
        assert name in heads, f"contrib_heads/{name} is not registered"
        reg = heads[name]
        assert reg.plugin == f"contrib_heads.{name}" and f"contrib_heads.{name}" in plugins.DEFAULT_PLUGINS
        manifest = json.loads((folder / "manifest.json").read_text())
        assert schemas.errors("head", manifest) == [], name
        assert manifest["name"] == name and reg.obj.manifest() == manifest
        assert Path(reg.obj.manifest_path).resolve() == (folder / "manifest.json").resolve()
        weights = reg.obj.weights_path()
        assert weights is None or weights.is_file(), f"{name}: declared weights {weights} are missing"


class SniffingReader:
    """A reader that claims nothing and remembers what discovery showed it."""

    name = "sniff-test"

    def __init__(self):
        self.seen: list[str] = []

    def sniff(self, source, head):
        self.seen.append(source.name)
        return False

    def scan_file(self, source, **kw):
        raise AssertionError("never claimed a file")

    def group(self, records):
        return []

    def load(self, ref):
        raise AssertionError("never grouped a series")


class ReaderPlugin:
    def __init__(self):
        self.reader = SniffingReader()

    @engine.hookimpl
    def register_readers(self, register):
        register(self.reader)


def test_a_plugin_reader_is_consulted_by_discovery(tmp_path):
    (tmp_path / "notes.txt").write_text("not an image")
    plugin = ReaderPlugin()
    plugins.pm.register(plugin, name="reader-test")
    try:
        readers = plugins.get_readers()
        assert readers["sniff-test"].plugin == "reader-test" and {"dicom", "nifti"} <= set(readers)
        found = engine.scan([tmp_path])
    finally:
        plugins.pm.unregister(plugin)
    assert "notes.txt" in plugin.reader.seen and not found.series


class CommandPlugin:
    @engine.hookimpl
    def register_commands(self, cli):
        @cli.command(name="hello-test")
        @click.argument("who")
        def hello(who):
            """Say hello."""
            click.echo(f"hello {who} from a plugin")


def test_a_plugin_adds_a_command_to_the_cli():
    from engine import cli as cli_module

    plugin = CommandPlugin()
    plugins.pm.register(plugin, name="command-test")
    try:
        cli_module._register_plugin_commands()  # what importing engine.cli does for installed plugins
        result = CliRunner().invoke(cli, ["hello-test", "world"])
        listed = {p["name"]: p for p in plugins.plugin_summaries()}
    finally:
        plugins.pm.unregister(plugin)
        cli.commands.pop("hello-test", None)
    assert result.exit_code == 0 and result.output == "hello world from a plugin\n"
    assert listed["command-test"]["hooks"] == ["register_commands"]


def test_two_plugins_claiming_one_head_name_make_it_broken_not_fatal(registered):
    class Twin:
        @engine.hookimpl
        def register_heads(self, register):
            register(type("EchoTwin", (EchoHead,), {}))

    twin = Twin()
    plugins.pm.register(twin, name="twin")
    try:
        heads, broken = plugins.get_head_classes(), plugins.get_broken_heads()
    finally:
        plugins.pm.unregister(twin)
    assert "echo" not in heads and "classify" in heads
    assert "registered by plugins echo-test, twin" in broken["echo"].reason


def test_a_misspelled_hook_fails_loudly():
    class Typo:
        @engine.hookimpl
        def register_haeds(self, register):
            pass

    typo = Typo()
    plugins.pm.register(typo, name="typo")
    try:
        with pytest.raises(pluggy.PluginValidationError, match="register_haeds"):
            plugins.pm.check_pending()
    finally:
        plugins.pm.unregister(typo)


def test_unknown_head_show_is_a_clear_error():
    result = CliRunner().invoke(cli, ["heads", "show", "nope"])
    assert result.exit_code != 0 and "no head named 'nope'" in result.output


@pytest.fixture(scope="module")
def installed_example(tmp_path_factory):
    """The example third-party package, pip-installed into a private folder on sys.path."""
    target = tmp_path_factory.mktemp("site")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "--target",
            str(target),
            str(EXAMPLE),
        ],
        check=True,
        capture_output=True,
    )
    sys.path.insert(0, str(target))
    yield target
    sys.path.remove(str(target))
    for name in [m for m in sys.modules if m.startswith("mrfm_head_brightness")]:
        del sys.modules[name]


def test_a_head_installed_through_an_entry_point_is_found(installed_example, monkeypatch):
    monkeypatch.setenv("MRFM_LOAD_PLUGINS", "brightness")
    monkeypatch.setattr(plugins, "_loaded", False)
    try:
        plugins.load_plugins()
        heads = plugins.get_head_classes()
        assert "brightness" in heads and heads["brightness"].plugin == "brightness"
        listed = {p["name"]: p for p in plugins.plugin_summaries()}
        assert listed["brightness"]["package"] == "mrfm-head-brightness" and listed["brightness"]["version"] == "0.1.0"
        assert listed["brightness"]["hooks"] == ["register_heads"]
    finally:
        plugin = plugins.pm.get_plugin("brightness")
        if plugin is not None:
            plugins.pm.unregister(plugin)


def test_entry_points_are_not_loaded_when_restricted(installed_example, monkeypatch):
    monkeypatch.setenv("MRFM_LOAD_PLUGINS", "")
    monkeypatch.setattr(plugins, "_loaded", False)
    plugins.load_plugins()
    assert plugins.pm.get_plugin("brightness") is None


def test_a_broken_entry_point_is_reported_not_fatal(tmp_path, monkeypatch):
    pkg = tmp_path / "site"
    (pkg / "broken_head").mkdir(parents=True)
    (pkg / "broken_head" / "__init__.py").write_text("raise ImportError('needs a library that is not installed')\n")
    dist = pkg / "broken_head-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-head\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[mrfm]\nbroken = broken_head\n")
    monkeypatch.syspath_prepend(str(pkg))
    monkeypatch.setenv("MRFM_LOAD_PLUGINS", "broken")
    monkeypatch.setattr(plugins, "_loaded", False)
    monkeypatch.setattr(plugins, "load_errors", {})
    with pytest.warns(UserWarning, match="'broken' could not be loaded"):
        plugins.load_plugins()
    assert "needs a library that is not installed" in plugins.load_errors["broken"]
    assert any(p["name"] == "broken" and p.get("error") for p in plugins.plugin_summaries())
    assert "classify" in plugins.get_head_classes()  # everything else still works
    with pytest.raises(
        engine.UsageError, match="head 'broken' could not be loaded.*needs a library that is not installed"
    ):
        plugins.select_heads(["classify", "broken"])


# ---- isolation: a broken plugin or head is listed with its reason and skipped -------------------
def write_head_package(root: Path, name: str, manifest: dict, predict_body: str = "return [{} for _ in batch]") -> Path:
    """A head package on disk: manifest.json plus a module registering one head class."""
    pkg = root / name
    pkg.mkdir(parents=True)
    (pkg / "manifest.json").write_text(json.dumps(manifest))
    (pkg / "__init__.py").write_text(
        "from pathlib import Path\nimport engine\n\n\n"
        "class ThisHead(engine.Head):\n"
        "    manifest_path = Path(__file__).with_name('manifest.json')\n\n"
        f"    def predict(self, batch):\n        {predict_body}\n\n\n"
        "@engine.hookimpl\ndef register_heads(register):\n    register(ThisHead)\n"
    )
    return pkg


def invalid_manifest() -> dict:
    m = json.loads(MANIFEST.read_text()) | {"name": "badhead"}
    m["outputs"] = [{"name": "x", "kind": "mask", "dtype": "float32"}]  # masks need labels and an integer dtype
    return m


@pytest.fixture
def broken_head_plugin(tmp_path, monkeypatch):
    """An installed-looking plugin whose head manifest breaks the schema."""
    write_head_package(tmp_path, "badhead_pkg", invalid_manifest())
    monkeypatch.syspath_prepend(str(tmp_path))
    import badhead_pkg

    plugins.pm.register(badhead_pkg, name="badhead-plugin")
    yield badhead_pkg
    plugins.pm.unregister(badhead_pkg)
    sys.modules.pop("badhead_pkg", None)


def test_an_invalid_manifest_makes_only_that_head_broken(broken_head_plugin):
    heads, broken = plugins.get_head_classes(), plugins.get_broken_heads()
    assert "badhead" not in heads and set(shipped_heads()) <= set(heads)
    assert broken["badhead"].plugin == "badhead-plugin"
    assert "outputs/0" in broken["badhead"].reason and "manifest" in broken["badhead"].reason


def test_head_commands_keep_working_beside_a_broken_head(broken_head_plugin):
    listed = CliRunner().invoke(cli, ["heads"])
    assert listed.exit_code == 0 and listed.exception is None, listed.output
    assert "classify" in listed.output and "badhead" in listed.output and "broken" in listed.output
    shown = CliRunner().invoke(cli, ["heads", "show", "classify"])
    assert shown.exit_code == 0 and '"region"' in shown.output
    bad = CliRunner().invoke(cli, ["heads", "show", "badhead"])
    assert bad.exit_code == 0 and bad.exception is None and '"broken"' in bad.output and "outputs/0" in bad.output
    plugs = CliRunner().invoke(cli, ["plugins", "--json"])
    assert plugs.exit_code == 0 and plugs.exception is None
    row = {p["name"]: p for p in json.loads(plugs.output)}["badhead-plugin"]
    assert "badhead" in row["broken"] and "Traceback" not in plugs.output


def test_selecting_a_broken_head_is_a_usage_error_with_the_reason(broken_head_plugin):
    with pytest.raises(engine.UsageError, match=r"head 'badhead' is broken \(badhead-plugin: .*outputs/0"):
        plugins.select_heads(["classify", "badhead"])
    assert "badhead" not in plugins.select_heads(None)
    assert list(plugins.select_heads(["classify"])) == ["classify"]


def test_a_run_with_other_heads_starts_beside_a_broken_head(broken_head_plugin, tmp_path):
    import nibabel
    from engine.testing import synthetic_volume

    volume = synthetic_volume("axial")
    (tmp_path / "in").mkdir()
    nibabel.save(nibabel.Nifti1Image(volume.data, volume.affine), str(tmp_path / "in" / "a.nii.gz"))
    result = CliRunner().invoke(
        cli,
        [
            "run",
            str(tmp_path / "in"),
            "--out",
            str(tmp_path / "r.zarr"),
            "--heads",
            "retrieve",
            "--backend",
            "torch",
            "--workers",
            "0",
        ],
    )
    assert result.exit_code == 0, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    chosen = CliRunner().invoke(
        cli,
        [
            "run",
            str(tmp_path / "in"),
            "--out",
            str(tmp_path / "r2.zarr"),
            "--heads",
            "retrieve,badhead",
            "--backend",
            "torch",
            "--workers",
            "0",
        ],
    )
    assert chosen.exit_code == 2 and "head 'badhead' is broken" in chosen.output and "Traceback" not in chosen.output


def test_a_hook_that_raises_is_recorded_against_its_plugin(monkeypatch):
    class Raising:
        @engine.hookimpl
        def register_heads(self, register):
            raise RuntimeError("cannot find my weights server")

    monkeypatch.setattr(plugins, "load_errors", {})
    plugin = Raising()
    plugins.pm.register(plugin, name="raising")
    try:
        heads = plugins.get_head_classes()
        listed = {p["name"]: p for p in plugins.plugin_summaries()}
    finally:
        plugins.pm.unregister(plugin)
    assert "classify" in heads
    assert "cannot find my weights server" in listed["raising"]["error"]


def test_a_default_plugin_that_fails_to_import_is_reported_not_fatal(tmp_path, monkeypatch):
    (tmp_path / "crashing_default.py").write_text("raise RuntimeError('half-installed')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(plugins, "DEFAULT_PLUGINS", (*plugins.DEFAULT_PLUGINS, "crashing_default"))
    monkeypatch.setattr(plugins, "_loaded", False)
    monkeypatch.setattr(plugins, "load_errors", {})
    with pytest.warns(UserWarning, match="'crashing_default' could not be loaded"):
        plugins.load_plugins()
    assert "half-installed" in plugins.load_errors["crashing_default"]
    assert "classify" in plugins.get_head_classes()


def test_an_entry_point_with_an_unknown_hook_is_dropped(monkeypatch):
    class Typo:
        @engine.hookimpl
        def register_haeds(self, register):
            pass

    monkeypatch.setattr(plugins, "load_errors", {})
    typo = Typo()
    with pytest.warns(UserWarning, match="unknown hook"):
        plugins._register(typo, "typo-ep", "typo-dist")
    assert not plugins.pm.is_registered(typo)
    assert "register_haeds" in plugins.load_errors["typo-ep"]


@pytest.fixture
def restore_disabled():
    yield
    plugins._disabled.clear()
    import contrib_heads.ground as ground

    if not plugins.pm.is_registered(ground):
        plugins.pm.register(ground, name="contrib_heads.ground")


def test_mrfm_disable_plugins_removes_a_default_head(monkeypatch, restore_disabled):
    monkeypatch.setenv("MRFM_DISABLE_PLUGINS", "contrib_heads.ground, someone-elses-plugin")
    assert "ground" not in plugins.get_head_classes() and "classify" in plugins.get_head_classes()
    row = {p["name"]: p for p in plugins.plugin_summaries()}["contrib_heads.ground"]
    assert row["disabled"]
    monkeypatch.setenv("MRFM_DISABLE_PLUGINS", "ground")  # the short name works too
    assert "ground" not in plugins.get_head_classes()
    monkeypatch.delenv("MRFM_DISABLE_PLUGINS")
    assert "ground" in plugins.get_head_classes()


def test_disable_unregisters_a_loaded_plugin(restore_disabled):
    assert plugins.disable(["ground"]) == ["contrib_heads.ground"]
    assert plugins.pm.get_plugin("contrib_heads.ground") is None
    assert "ground" not in plugins.get_head_classes()


def test_disabled_entry_points_do_not_load(installed_example, monkeypatch):
    monkeypatch.setenv("MRFM_LOAD_PLUGINS", "brightness")
    monkeypatch.setenv("MRFM_DISABLE_PLUGINS", "mrfm-head-brightness")  # by distribution name
    monkeypatch.setattr(plugins, "_loaded", False)
    plugins.load_plugins()
    assert plugins.pm.get_plugin("brightness") is None
    assert {p["name"]: p for p in plugins.plugin_summaries()}["brightness"]["disabled"]


# ---- encoders and exporters ----------------------------------------------------------------------
class TinyArchitecture:
    name = "tiny-test"
    built: list = []

    @classmethod
    def build(cls, card):
        from engine.model import VisionTransformer3D, config_from_card

        cls.built.append(card["name"])
        return VisionTransformer3D(config_from_card(card))


class EncoderPlugin:
    @engine.hookimpl
    def register_encoders(self, register):
        register(TinyArchitecture)


def default_card() -> dict:
    from engine.model import DEFAULT_MODEL_DIR, read_card

    return read_card(DEFAULT_MODEL_DIR)


def test_the_model_card_names_its_encoder_architecture():
    from engine.model import VisionTransformer3D, build_encoder

    assert plugins.get_encoders()["vit3d"].plugin == "plugins.encoders"
    card = default_card()
    assert card["encoder"]["architecture"] == "vit3d"
    assert isinstance(build_encoder(card), VisionTransformer3D)
    card["encoder"].pop("architecture")  # absent means vit3d
    assert schemas.errors("model", card) == [] and isinstance(build_encoder(card), VisionTransformer3D)


def test_a_plugin_encoder_architecture_is_built_from_the_card():
    from engine.model import build_encoder

    plugin = EncoderPlugin()
    plugins.pm.register(plugin, name="encoder-test")
    try:
        card = default_card()
        card["encoder"]["architecture"] = "tiny-test"
        assert schemas.errors("model", card) == []
        build_encoder(card)
    finally:
        plugins.pm.unregister(plugin)
    assert TinyArchitecture.built == [card["name"]]


def test_an_unknown_encoder_architecture_names_the_registered_ones():
    from engine.model import build_encoder

    card = default_card()
    card["encoder"]["architecture"] = "swin3d"
    with pytest.raises(engine.UsageError, match=r"unknown encoder architecture 'swin3d'; registered: vit3d"):
        build_encoder(card)


class ParquetLikeExporter:
    name = "table-test"


class ExporterPlugin:
    @engine.hookimpl
    def register_exporters(self, register):
        register(ParquetLikeExporter())


def test_a_plugin_exporter_is_registered():
    plugin = ExporterPlugin()
    plugins.pm.register(plugin, name="exporter-test")
    try:
        exporters = plugins.get_exporters()
    finally:
        plugins.pm.unregister(plugin)
    assert (
        isinstance(exporters["table-test"].obj, ParquetLikeExporter)
        and exporters["table-test"].plugin == "exporter-test"
    )


# ---- code-aware head fingerprints ----------------------------------------------------------------
def import_fresh(name: str):
    import importlib

    for mod in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
        del sys.modules[mod]
    importlib.invalidate_caches()
    return importlib.import_module(name)


def test_editing_a_heads_code_changes_its_fingerprint_and_nothing_else_does(tmp_path, monkeypatch):
    from engine.fingerprint import head_code_digest, head_fingerprints, head_record

    manifest = json.loads(MANIFEST.read_text())
    write_head_package(tmp_path, "fp_head_a", manifest | {"name": "fpa"}, "return [{'x': 1} for _ in batch]")
    other = write_head_package(tmp_path, "fp_head_b", manifest | {"name": "fpb"})
    monkeypatch.syspath_prepend(str(tmp_path))

    def fingerprint() -> tuple[str, str]:
        cls = import_fresh("fp_head_a").ThisHead
        record = head_record("fpa", cls)
        return head_code_digest(cls), head_fingerprints("sha256:model", [record], {}, {})["fpa"]

    code, fp = fingerprint()
    assert code.startswith("sha256:") and fingerprint() == (code, fp)
    # reformatting another head's module, in another package, changes nothing
    (other / "__init__.py").write_text((other / "__init__.py").read_text().replace("\n\n\n", "\n\n\n\n"))
    assert fingerprint() == (code, fp)
    # editing predict changes the code digest and the head's resume fingerprint
    init = tmp_path / "fp_head_a" / "__init__.py"
    init.write_text(init.read_text().replace("{'x': 1}", "{'x': 2}"))
    new_code, new_fp = fingerprint()
    assert new_code != code and new_fp != fp
    # a helper module inside the head's package counts as its code too
    (tmp_path / "fp_head_a" / "helpers.py").write_text("SCALE = 2\n")
    assert fingerprint()[0] != new_code
    for name in ("fp_head_a", "fp_head_b"):
        sys.modules.pop(name, None)


def test_code_sha256_enters_the_run_and_head_fingerprints():
    from engine.fingerprint import head_fingerprints, run_fingerprint

    head = {"name": "h", "version": "1", "manifest": {}, "weights_sha256": None}
    with_code = head | {"code_sha256": "sha256:a"}
    assert head_fingerprints("m", [with_code], {}, {}) != head_fingerprints("m", [head], {}, {})
    assert head_fingerprints("m", [with_code], {}, {}) != head_fingerprints(
        "m", [head | {"code_sha256": "sha256:b"}], {}, {}
    )
    assert run_fingerprint("m", [with_code], {}, {}) != run_fingerprint("m", [head], {}, {})


def test_a_head_from_an_installed_distribution_is_fingerprinted_by_its_record(installed_example, monkeypatch):
    from engine import fingerprint

    fingerprint._providers.cache_clear()
    monkeypatch.syspath_prepend(str(installed_example))
    head = import_fresh("mrfm_head_brightness").BrightnessHead
    dist = fingerprint._distribution_of(head.__module__, Path(sys.modules[head.__module__].__file__).resolve())
    assert dist is not None and dist.metadata["Name"] == "mrfm-head-brightness"
    assert fingerprint.head_code_digest(head) == fingerprint._distribution_digest(dist)
    # the shipped heads come from an editable checkout: their sources are hashed instead
    from contrib_heads.classify import ClassifyHead

    assert (
        fingerprint._distribution_of(
            ClassifyHead.__module__, Path(sys.modules[ClassifyHead.__module__].__file__).resolve()
        )
        is None
    )
    fingerprint._providers.cache_clear()
