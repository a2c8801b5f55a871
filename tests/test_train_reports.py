"""mskd_fast.reports: the terminal table keeps one number format per column."""

from mskd_fast.reports import format_table


def test_format_table_one_decimal_count_per_column():
    rows = [[1, 1.01, 27.5, float("nan"), 359.2], [2, 0.7779, 0.5, 3.0, 12345.6]]
    text = format_table(rows, ["epoch", "loss", "mAP", "x", "img/s"])
    lines = text.splitlines()
    assert lines[0].split() == ["epoch", "loss", "mAP", "x", "img/s"]
    assert lines[2].split() == ["1", "1.0100", "27.50", "-", "359"]
    assert lines[3].split() == ["2", "0.7779", "0.50", "3.0000", "12346"]
    assert len({len(line) for line in lines}) == 1  # right-aligned columns
