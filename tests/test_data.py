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


# ------------------------------------------------------------------ without a data folder: the hub


@pytest.fixture
def no_data_folder(monkeypatch):
    """No local data folder anywhere: the datasets library is the only source."""
    import sparseforge_compile.data as data

    monkeypatch.delenv("SPARSEFORGE_DATA", raising=False)
    monkeypatch.setattr(data, "default_data_dir", lambda: None)
    return data


def _stand_in(monkeypatch, fn):
    import datasets

    calls = []

    def load_dataset(*args, **kwargs):
        calls.append((args, kwargs))
        return fn(*args, **kwargs)

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return calls


def test_wikitext_from_the_hub_is_the_local_text(no_data_folder, monkeypatch, data_dir):
    raw = (data_dir / "wikitext-2-raw/wiki.test.raw").read_text(encoding="utf-8")
    rows = [line if line.strip() else "" for line in raw.splitlines(keepends=True)]  # the hub's "text" column
    calls = _stand_in(monkeypatch, lambda *a, **k: {"text": rows})
    assert no_data_folder.load_wikitext2("test") == no_data_folder.load_wikitext2("test", data_dir)
    assert calls[0][0] == ("Salesforce/wikitext", "wikitext-2-raw-v1") and calls[0][1]["split"] == "test"


def test_a_hub_text_that_differs_from_the_protocol_is_refused(no_data_folder, monkeypatch):
    _stand_in(monkeypatch, lambda *a, **k: {"text": [" = Title = \n", "", " other text \n"]})
    with pytest.raises(DataError, match="not the protocol's text"):
        no_data_folder.load_wikitext2("valid")


def test_c4_from_the_hub_takes_the_shards_first_documents(no_data_folder, monkeypatch):
    calls = _stand_in(monkeypatch, lambda *a, **k: iter({"text": f"doc {i}"} for i in range(5000)))
    docs = no_data_folder.load_c4_documents()
    assert docs == [f"doc {i}" for i in range(1000)]
    assert calls[0][1]["data_files"] == {"train": "en/c4-train.00000-of-01024.json.gz"}


def test_no_folder_and_no_hub_is_one_line(no_data_folder, monkeypatch):
    def unreachable(*a, **k):
        raise ConnectionError("no network")

    _stand_in(monkeypatch, unreachable)
    for load in (lambda: no_data_folder.load_wikitext2("test"), no_data_folder.load_c4_documents):
        with pytest.raises(DataError, match="no local data folder .* not reachable") as info:
            load()
        assert "\n" not in str(info.value)


# ------------------------------------------------------------------ the user's own calibration text


def test_user_text_files_become_documents(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from sparseforge_compile.data import calibration_documents, read_documents

    (tmp_path / "a.txt").write_text("one whole document\nwith two lines\n")
    (tmp_path / "b.jsonl").write_text('{"text": "first"}\n\n{"text": "second", "id": 2}\n')
    pq.write_table(pa.table({"text": ["p1", "p2", ""]}), tmp_path / "c.parquet")
    assert read_documents(tmp_path / "a.txt") == ["one whole document\nwith two lines\n"]
    assert read_documents(tmp_path / "b.jsonl") == ["first", "second"]
    assert read_documents(tmp_path / "c.parquet") == ["p1", "p2"]
    assert calibration_documents([str(tmp_path / "b.jsonl"), str(tmp_path / "c.parquet")]) == ["first", "second",
                                                                                                "p1", "p2"]


@pytest.mark.parametrize("name, content, message", [
    ("x.jsonl", '{"text": "ok"}\n{"body": "no text"}\n', r"x.jsonl:2: no 'text' text field"),
    ("x.jsonl", '{"text": "ok"}\nnot json\n', r"x.jsonl:2: not a JSON line"),
    ("x.txt", b"\xff\xfe bad bytes", r"x.txt: not UTF-8 text"),
    ("x.jsonl", b'{"text": "\xff"}\n', r"x.jsonl: not UTF-8 text"),
    ("x.txt", "   \n", r"x.txt: holds no documents"),
    ("x.parquet", b"PAR1 not really", r"x.parquet: not a readable parquet file"),
])
def test_bad_calibration_files_name_the_file_and_line(tmp_path, name, content, message):
    from sparseforge_compile.data import read_documents

    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(DataError, match=message):
        read_documents(path)
    with pytest.raises(DataError, match="is not a file"):
        read_documents(tmp_path / "missing.txt")


def test_calibration_windows_come_from_the_users_text(tmp_path):
    path = tmp_path / "domain.txt"
    path.write_text("domain words " * 200)
    tok = ByteTokenizer()
    windows = calibration_windows(tok, 3, 64, seed=0, sources=(str(path),))
    text = path.read_text()
    for row in windows:
        assert bytes(row.tolist()).decode() in text
