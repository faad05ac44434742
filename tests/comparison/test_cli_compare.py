"""The ``compare`` and ``report`` commands: user errors in one line, exit status 2."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from edgequant.cli import app


def test_bad_items_and_presets_are_user_errors(tmp_path: Path) -> None:
    for args, text in ((["--methods", "nope:w4g128"], "unknown --methods item"),
                       (["--preset", "huge"], "unknown preset"),
                       (["--methods", "gguf:Q9"], "unknown GGUF file type")):
        res = CliRunner().invoke(app, ["compare", "-o", str(tmp_path / "x"), *args])
        assert res.exit_code == 2, res.output
        assert text in res.output and "Traceback" not in res.output
    assert not (tmp_path / "x" / "results.db").exists()


def test_help_lists_both_commands() -> None:
    res = CliRunner().invoke(app, ["--help"])
    assert "compare" in res.output and "report" in res.output


def test_eq_compare_stays_callable_after_the_package_is_imported() -> None:
    import pytest

    import edgequant as eq
    import edgequant.comparison.runner  # noqa: F401  (rebinds eq.compare to the package)
    from edgequant.comparison import MatrixError

    for _ in range(2):
        with pytest.raises(MatrixError, match="unknown --methods item"):
            eq.compare(methods="nope:w4g128", out_dir="/nonexistent/never-written")
