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


def test_duplicate_head_names_are_refused(registered):
    class Twin:
        @engine.hookimpl
        def register_heads(self, register):
            register(type("EchoTwin", (EchoHead,), {}))

    twin = Twin()
    plugins.pm.register(twin, name="twin")
    try:
        with pytest.raises(ValueError, match="'echo' from plugin 'twin' is already registered by 'echo-test'"):
            plugins.get_head_classes()
    finally:
        plugins.pm.unregister(twin)


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
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target", str(target), str(EXAMPLE)],
        check=True, capture_output=True,
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
