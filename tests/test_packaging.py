"""What ships to a store and what stays in the checkout (DESIGN.md "Layout": demo and
test harnesses are not shipped to stores).

The wheel is built for real from a copy of this checkout, so a stale ``build/`` folder
cannot hide or add anything; the demo is run the way a newcomer runs it.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ("gateway", "firmware_bridge", "cloud_sync")
# Copied to build the wheel: the project, the packages and the harness that must stay out.
SOURCES = ("pyproject.toml", "README.md", *SHIPPED, "devtools")


def _copy_checkout(dest: Path, names: tuple[str, ...]) -> Path:
    dest.mkdir()
    for name in names:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, dest / name)
    return dest


@pytest.mark.build
def test_the_wheel_ships_the_product_and_no_harness(tmp_path: Path) -> None:
    source = _copy_checkout(tmp_path / "src", SOURCES)
    out = tmp_path / "wheel"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "-q", "-w", str(out)],
        check=True,
        capture_output=True,
        timeout=110,
    )
    (wheel,) = out.glob("metalav_gateway-*.whl")
    modules = {
        name.removesuffix(".py").replace("/", ".")
        for name in zipfile.ZipFile(wheel).namelist()
        if name.endswith(".py")
    }
    top_level = {m.split(".")[0] for m in modules}
    assert set(SHIPPED) <= top_level, top_level
    assert top_level == set(SHIPPED), f"unexpected top-level modules: {top_level - set(SHIPPED)}"
    harness = sorted(
        m
        for m in modules
        if any(part in ("demo", "localbroker", "devstack", "devtools") for part in m.split("."))
    )
    assert harness == [], harness
    # metalavctl speaks Portuguese in a store only if the compiled catalog ships.
    assert "gateway/locale/pt_BR/LC_MESSAGES/metalav.mo" in zipfile.ZipFile(wheel).namelist()
    assert "firmware_bridge.simulator" in modules or any(
        m.startswith("firmware_bridge.simulator.") for m in modules
    ), "the simulated board is a product feature and ships"


def test_demo_runs_from_a_source_checkout_as_a_newcomer_runs_it(tmp_path: Path) -> None:
    # ./scripts/demo.sh ends in `.venv/bin/metalav-gateway demo`: the console script,
    # whose sys.path holds the editable install's packages but not devtools/.
    script = Path(sys.executable).parent / "metalav-gateway"
    if not script.exists():
        pytest.skip("the metalav-gateway console script is not installed next to this Python")
    done = subprocess.run(
        [str(script), "demo"], cwd=tmp_path, capture_output=True, text=True, timeout=90
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "one payment, one release - OK" in done.stdout


def test_demo_says_it_needs_a_source_checkout_where_devtools_is_absent(tmp_path: Path) -> None:
    # An installed store box: the shipped packages, and no devtools/ beside them.
    site = _copy_checkout(tmp_path / "site", SHIPPED)
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from gateway.daemon import main; sys.exit(main())",
            "demo",
        ],
        cwd=site,  # '' first on sys.path: these copies, not the checkout
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2, done.stdout + done.stderr
    assert "the demo runs from a source checkout" in done.stderr
    assert "Traceback" not in done.stderr
