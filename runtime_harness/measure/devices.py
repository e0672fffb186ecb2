"""Device profiles (runtime_harness/measure/devices.toml): the phone a profile is judged against.

Each figure carries its source, and a note where it is an estimate. `get_device(name)` for
`ple-export profile --device`, `list_devices()` for `ple-export devices`.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ple_export.errors import UserError

if TYPE_CHECKING:
    from rich.console import Group

DEVICES_FILE = Path(__file__).with_name("devices.toml")

# figure key -> (unit shown to people, lowest sane value, highest sane value)
FIGURES: dict[str, tuple[str, float, float]] = {
    "ram_mb": ("MiB", 256, 1 << 22),
    "app_budget_mb": ("MiB", 64, 1 << 22),
    "page_size": ("B", 4096, 1 << 20),
    "flash_read_4k_us": ("us", 1, 100_000),
    "flash_read_16k_us": ("us", 1, 100_000),
    "flash_seq_read_mb_s": ("MB/s", 1, 100_000),
    "dram_bandwidth_gb_s": ("GB/s", 0.1, 10_000),
    "prefill_chunk": ("tok", 1, 1 << 16),
}


@dataclass(frozen=True)
class Figure:
    value: float
    source: str
    estimate: bool = False
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"value": self.value, "source": self.source}
        if self.estimate:
            d["estimate"] = True
        if self.note:
            d["note"] = self.note
        return d


@dataclass(frozen=True)
class Device:
    name: str
    description: str
    figures: dict[str, Figure]

    def __getitem__(self, key: str) -> float:
        return self.figures[key].value

    @property
    def page_size(self) -> int:
        return int(self["page_size"])

    @property
    def prefill_chunk(self) -> int:
        """Prompt tokens per prefill call on this device (`runtime_harness.loop`)."""
        return int(self["prefill_chunk"])

    @property
    def app_budget_bytes(self) -> int:
        return int(self["app_budget_mb"] * (1 << 20))

    def page_read_us(self, page: int | None = None) -> float:
        """Latency of one fault reading a page of `page` bytes (default: the device's page size):
        the 4 KiB or 16 KiB figure, otherwise the 4 KiB one plus the rest at sequential bandwidth."""
        page = page or self.page_size
        if page == 4096:
            return self["flash_read_4k_us"]
        if page == 16384:
            return self["flash_read_16k_us"]
        return self["flash_read_4k_us"] + (page - 4096) / (self["flash_seq_read_mb_s"] * 1e6) * 1e6

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.description,
            **{key: fig.to_dict() for key, fig in self.figures.items()},
        }


def _figure(device: str, key: str, raw: Any, where: Path) -> Figure:
    if not isinstance(raw, dict):
        raise UserError(f"{where}: [{device}.{key}] must be a table with value and source")
    unknown = set(raw) - {"value", "source", "estimate", "note"}
    if unknown:
        raise UserError(f"{where}: [{device}.{key}] has unknown keys {sorted(unknown)}")
    value, source = raw.get("value"), raw.get("source")
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise UserError(f"{where}: [{device}.{key}] value must be a number")
    _, lo, hi = FIGURES[key]
    if not lo <= value <= hi:
        raise UserError(f"{where}: [{device}.{key}] value {value} is outside [{lo}, {hi}]")
    if not isinstance(source, str) or not source.strip():
        raise UserError(f"{where}: [{device}.{key}] needs a source (a URL or a citation)")
    estimate, note = raw.get("estimate", False), raw.get("note", "")
    if not isinstance(estimate, bool) or not isinstance(note, str):
        raise UserError(f"{where}: [{device}.{key}] estimate must be true/false and note a string")
    if estimate and not note.strip():
        raise UserError(f"{where}: [{device}.{key}] is an estimate: say how in a note")
    return Figure(float(value), source, estimate, note)


def parse_devices(doc: dict[str, Any], where: Path) -> dict[str, Device]:
    devices = {}
    for name, table in doc.items():
        if not isinstance(table, dict):
            raise UserError(f"{where}: {name!r} must be a table ([{name}])")
        description = table.get("description")
        if not isinstance(description, str):
            raise UserError(f"{where}: [{name}] needs a description")
        missing = [k for k in FIGURES if k not in table]
        unknown = sorted(set(table) - set(FIGURES) - {"description"})
        if missing or unknown:
            raise UserError(f"{where}: [{name}] missing {missing}, unknown {unknown}")
        figures = {key: _figure(name, key, table[key], where) for key in FIGURES}
        if int(figures["page_size"].value) & (int(figures["page_size"].value) - 1):
            raise UserError(f"{where}: [{name}.page_size] must be a power of two")
        if figures["app_budget_mb"].value > figures["ram_mb"].value:
            raise UserError(f"{where}: [{name}] app_budget_mb exceeds ram_mb")
        devices[name] = Device(name, description, figures)
    if not devices:
        raise UserError(f"{where}: no devices")
    return devices


def load_devices(path: Path = DEVICES_FILE) -> dict[str, Device]:
    try:
        with open(path, "rb") as f:
            doc = tomllib.load(f)
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror or e})") from None
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"{path}: not valid TOML ({e})") from None
    return parse_devices(doc, path)


@cache
def _builtin() -> dict[str, Device]:
    return load_devices(DEVICES_FILE)


def get_device(name: str) -> Device:
    devices = _builtin()
    if name not in devices:
        raise UserError(f"unknown device {name!r}; known: {', '.join(sorted(devices))}")
    return devices[name]


def list_devices() -> list[dict[str, Any]]:
    """One row per device for `ple-export devices`: figures with units, estimates marked, sources."""
    rows = []
    for dev in _builtin().values():
        rows.append(
            {
                **dev.to_dict(),
                "units": {key: unit for key, (unit, _, _) in FIGURES.items()},
            }
        )
    return rows


_SHORT = {
    "ram_mb": "RAM",
    "app_budget_mb": "budget",
    "page_size": "page",
    "flash_read_4k_us": "4K rd",
    "flash_read_16k_us": "16K rd",
    "flash_seq_read_mb_s": "seq rd",
    "dram_bandwidth_gb_s": "DRAM",
    "prefill_chunk": "chunk",
}


def render_devices(rows: list[dict[str, Any]] | None = None) -> Group:
    """`list_devices()` for people: a table of figures (`~` marks an estimate) that fits 80 columns
    with the device names whole, then each device's description; the sources are in `--json` and in
    devices.toml."""
    from rich import box
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    rows = rows if rows is not None else list_devices()
    table = Table(
        title="device profiles (~ = estimate; sources: --json or devices.toml)",
        box=box.SIMPLE_HEAD,
        pad_edge=False,
        collapse_padding=True,
    )
    table.add_column("device", style="bold", no_wrap=True)  # the names are what one types: never cut
    for key, (unit, _, _) in FIGURES.items():
        table.add_column(f"{_SHORT[key]}\n{unit}", justify="right", no_wrap=True)
    for row in rows:
        cells = [f"{'~' if row[k].get('estimate') else ''}{row[k]['value']:g}" for k in FIGURES]
        table.add_row(row["name"], *cells)
    notes = [Text.assemble((f"{row['name']}: ", "bold"), str(row["description"])) for row in rows]
    return Group(table, *notes)
