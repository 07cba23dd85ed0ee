"""What the package installs: `flowdb` and `flowdb_api`, never a top-level `api` that would shadow a user's own."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from importlib.metadata import entry_points
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_the_serve_command_comes_from_flowdb_api() -> None:
    (serve,) = [ep for ep in entry_points(group="flowdb.commands") if ep.name == "serve"]
    assert serve.value == "flowdb_api.cli:serve"
    assert serve.load().name == "serve"


@pytest.mark.slow
def test_the_wheel_holds_flowdb_and_flowdb_api_only(tmp_path: Path) -> None:
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w",
                    str(tmp_path), str(ROOT)], check=True, capture_output=True)
    (wheel,) = tmp_path.glob("flowdb-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")}
    assert top == {"flowdb", "flowdb_api"}
    assert "flowdb_api/routes/events.py" in names
    assert "flowdb/_migrations/env.py" in names and "flowdb/_sql/v_cost_by_agent.sql" in names
    # The web UI's templates, scripts, styles and vendored libraries (with their licences) ship too.
    ui = ROOT / "api" / "ui"
    shipped = {str(path.relative_to(ui)) for folder in ("templates", "static") for path in (ui / folder).rglob("*")
               if path.is_file()}
    assert shipped and {f"flowdb_api/ui/{name}" for name in shipped} <= set(names)
