import pytest
import torch

from sparseforge_compile.data import (
    DataError,
    calibration_windows,
    eval_windows,
    load_wikitext2,
    resolve_data_dir,
    tokenize,
)
from sparseforge_compile.models import ByteTokenizer


def test_wikitext_join_follows_the_protocol(data_dir):
    text = load_wikitext2("test", data_dir)
    assert len(text) == 1_294_336  # the figure in the data README
    raw_lines = (data_dir / "wikitext-2-raw/wiki.test.raw").read_text().splitlines(keepends=True)
    assert text == "\n\n".join(line if line.strip() else "" for line in raw_lines)


def test_window_count_and_tokens_for_a_known_text():
    tokens = torch.arange(10_007)
    windows = eval_windows(tokens, 1000)
    assert windows.shape == (10, 1000)  # numel // seqlen windows, tail dropped
    assert torch.equal(windows.reshape(-1), tokens[:10_000])  # identical tokens, non-overlapping, in order
    assert eval_windows(tokens, 1000, max_windows=3).shape == (3, 1000)


def test_wikitext_windows_with_byte_tokens(data_dir):
    tok = ByteTokenizer()
    text = load_wikitext2("valid", data_dir)
    tokens = tokenize(tok, text)
    assert tokens.numel() == len(text.encode("utf-8"))
    windows = eval_windows(tokens, 2048)
    assert windows.shape[0] == tokens.numel() // 2048
    assert windows[1, 0] == tokens[2048]


def test_seqlen_longer_than_text_is_a_clear_error():
    with pytest.raises(DataError, match="smaller --seqlen"):
        eval_windows(torch.arange(100), 2048)


def test_missing_data_dir_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="--data-dir"):
        resolve_data_dir(tmp_path / "nope")


def test_missing_file_names_it(tmp_path):
    with pytest.raises(DataError, match="wiki.test.raw"):
        load_wikitext2("test", tmp_path)


def test_calibration_windows_are_seeded_and_from_c4(data_dir):
    tok = ByteTokenizer()
    a = calibration_windows(tok, 4, 256, seed=0, data_dir=data_dir)
    b = calibration_windows(tok, 4, 256, seed=0, data_dir=data_dir)
    c = calibration_windows(tok, 4, 256, seed=1, data_dir=data_dir)
    assert a.shape == (4, 256) and torch.equal(a, b) and not torch.equal(a, c)
