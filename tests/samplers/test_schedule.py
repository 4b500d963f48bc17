"""GDF schedule: every row of the spec's schedule tables (computed with the original gdf code), at printed
precision."""

import math
import re

import pytest
import tiny_checkpoints as tc
import torch

from comfyui_stablecascade.samplers import schedule

# A copy of the spec's tables (computed with the original gdf code) ships with the tests.
TABLES = tc.DATA / "schedule_tables.md"
HEADER = re.compile(
    r"^##\s+(?P<title>.*?):\s*t_start=(?P<t_start>[\d.]+),\s*steps=(?P<steps>\d+),\s*shift=(?P<shift>[\d.]+)"
)
COLUMNS = ("i", "t", "logsnr", "r", "a", "b")


def parse_tables(path=TABLES) -> list[dict]:
    """Each '## <title>: t_start=.., steps=.., shift=..' section with its rows as {column: printed string}."""
    tables = []
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            match = HEADER.match(line)
            if match:
                tables.append({**match.groupdict(), "rows": []})
                continue
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if tables and len(cells) == len(COLUMNS) and cells[0].isdigit():
                tables[-1]["rows"].append(dict(zip(COLUMNS, cells)))
    return tables


def close_at_printed_precision(value: float, printed: str) -> bool:
    """True when value rounds to the printed number: |value - printed| <= half a unit in its last place."""
    decimals = len(printed.split(".")[1]) if "." in printed else 0
    half_ulp = 0.5 * 10.0**-decimals
    return abs(value - float(printed)) <= half_ulp * (1 + 1e-6)


TABLE_LIST = parse_tables()  # a committed file of the tests: missing, collection fails


def test_tables_parsed():
    tables = parse_tables()
    assert [len(t["rows"]) for t in tables] == [int(t["steps"]) + 1 for t in tables]
    assert len(tables) == 4


@pytest.mark.parametrize("table", TABLE_LIST, ids=[t["title"] for t in TABLE_LIST])
def test_every_row_matches_official(table):
    steps, shift, t_start = int(table["steps"]), float(table["shift"]), float(table["t_start"])
    t = schedule.timesteps(steps, t_start)
    logsnr = schedule.logsnr(t, shift)
    assert t.dtype == logsnr.dtype == torch.float32
    r = schedule.noise_cond_r(logsnr)
    a, b = schedule.alpha_sigma(logsnr)
    computed = {"t": t, "logsnr": logsnr, "r": r, "a": a, "b": b}
    mismatches = []
    for row in table["rows"]:
        i = int(row["i"])
        for column, values in computed.items():
            printed = row[column]
            if printed.startswith("("):  # "(end, no model call)"
                continue
            if not close_at_printed_precision(values[i].item(), printed):
                mismatches.append(f"{column}[{i}]={values[i].item():.7f} printed {printed}")
    assert not mismatches, mismatches
    assert torch.equal(schedule.logsnr_schedule(steps, shift, t_start), logsnr)


def test_float32_end_points():
    # float32 clamping makes the range asymmetric; float64 would give +-9.21024 at both ends.
    low, high = schedule.logsnr_limits()
    assert close_at_printed_precision(low, "-9.21024") and close_at_printed_precision(high, "9.21007")
    assert high < -low - 1e-4
    # The shift moves logSNR down by 2 ln(shift) and is then clamped to the shift-1 limits.
    assert schedule.logsnr(1.0, shift=2.0).item() == low
    assert schedule.logsnr(1.0, shift=0.5).item() == pytest.approx(low + 2 * math.log(2), abs=1e-5)
    assert schedule.logsnr(0.0, shift=0.5).item() == high


def test_shift_is_a_logsnr_offset():
    t = torch.linspace(0.9, 0.1, 9)
    diff = schedule.logsnr(t, 3.0) - schedule.logsnr(t, 1.0)
    # logSNR values up to |4.4| here: a few float32 ulps (4.8e-7); measured 2.4e-7.
    torch.testing.assert_close(diff, torch.full_like(diff, -2 * math.log(3.0)), atol=2e-6, rtol=0)


def test_noise_cond_inverts_unshifted_schedule():
    t = torch.linspace(0.95, 0.05, 19)
    torch.testing.assert_close(schedule.noise_cond_r(schedule.logsnr(t)), t, atol=1e-6, rtol=0)  # measured 2.1e-7
    # Clamped ends: the model sees 0.99358 at t=1 (not 1.0) and 0.00226 at t=0.
    assert close_at_printed_precision(schedule.noise_cond_r(schedule.logsnr(1.0)).item(), "0.99358")
    assert close_at_printed_precision(schedule.noise_cond_r(schedule.logsnr(0.0)).item(), "0.00226")


def test_alpha_sigma_is_variance_preserving():
    a, b = schedule.alpha_sigma(torch.linspace(-9, 9, 37))
    torch.testing.assert_close(a**2 + b**2, torch.ones(37), atol=1e-6, rtol=0)
    assert (a[1:] > a[:-1]).all()


def test_timesteps_and_accepted_inputs():
    t = schedule.timesteps(16, t_start=0.8)
    assert t.shape == (17,) and t[0].item() == pytest.approx(0.8) and t[-1].item() == 0.0
    # Python numbers and float64 tensors give the float32 result.
    assert schedule.logsnr(0.5).dtype == torch.float32
    assert torch.equal(schedule.logsnr(torch.tensor([0.5], dtype=torch.float64)), schedule.logsnr(torch.tensor([0.5])))
