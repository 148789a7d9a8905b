"""Records through host shared memory (strategies/shared.py): files written by a node read back as the
bytes they were, mapped read-only by the server and removed when nothing views them; names that are
not the server's own files reject the block; a run through files equals the run with inline records."""

import gc
import logging
import os

import numpy as np
import pandas as pd
import pytest
import torch

from strategies import shared
from strategies.records import BlockReplies, file_ref, record_to_states, replies_to_record
from strategies.shared import SharedFiles

from test_engines import same_metrics
from test_records import heterogeneous_states, replies_for, tree_equal


@pytest.fixture
def files(tmp_path):
    f = SharedFiles.create(tmp_path)
    yield f
    f.close()


def chunks():
    a = np.arange(10, dtype=np.float32)
    return [memoryview(a).cast("B"), b"\0" * 8, memoryview(np.arange(3, dtype=np.int64)).cast("B")]


def test_a_file_reads_back_and_its_mapping_removes_it_when_freed(files, tmp_path):
    data = b"".join(bytes(c) for c in chunks())
    node = SharedFiles.attach(str(files.path))
    assert node is not None and SharedFiles.attach(str(tmp_path / "elsewhere")) is None
    name = node.write(chunks(), len(data))
    assert name is not None and (files.path / name).stat().st_size == len(data)
    own = node.map_private(name, len(data))
    assert own.tobytes() == data and own.flags.writeable
    mapped = files.map(name, len(data))
    assert mapped.tobytes() == data and not mapped.flags.writeable
    own[:4] = 255  # copy-on-write: neither the file nor the server's mapping sees it
    assert mapped.tobytes() == data and (files.path / name).read_bytes() == data
    del own
    assert files.map(name, len(data)) is mapped  # read again: the same mapping
    view = mapped[8:16].view(np.float32)
    del mapped
    gc.collect()
    assert (files.path / name).exists() and view.tolist() == [2.0, 3.0]  # a view keeps the mapping and file
    del view
    gc.collect()
    assert not (files.path / name).exists()
    files.close()
    assert not files.path.exists()


def test_directories_of_dead_servers_are_swept(tmp_path):
    import subprocess
    import sys

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = tmp_path / "fedgluon-0123"
    dead.mkdir()
    (dead / shared.MARKER).write_text(gone.stdout.strip())
    (dead / ("2" * 32)).write_bytes(b"left behind")
    alive = SharedFiles.create(tmp_path)
    unrelated = tmp_path / "fedgluon-notes"
    unrelated.mkdir()
    assert not dead.exists() and alive.path.exists()
    assert shared.sweep(tmp_path) == [] and unrelated.exists()  # a live server's and a non-run directory stay
    alive.close()


def test_names_sizes_and_links_other_than_its_own_files_are_refused(files, tmp_path):
    node = SharedFiles.attach(str(files.path))
    name = node.write([b"x" * 16], 16)
    for bad in ("../x", "a" * 31, "A" * 32, 7):
        with pytest.raises(ValueError, match="32 hex digits"):
            files.map(bad, 16)
    with pytest.raises(ValueError, match="No such file"):
        files.map("0" * 32, 16)
    with pytest.raises(ValueError, match="holds 16 bytes"):
        files.map(name, 17)
    with pytest.raises(ValueError, match="holds 16 bytes, its reference says 15"):
        node.map_private(name, 15)
    outside = tmp_path / "secret"
    outside.write_bytes(b"y" * 16)
    os.symlink(outside, files.path / ("1" * 32))
    with pytest.raises(ValueError):
        files.map("1" * 32, 16)


def test_a_node_sends_inline_when_the_directory_is_gone(files, caplog):
    node = SharedFiles.attach(str(files.path))
    files.close()
    with caplog.at_level(logging.WARNING, logger="fedgluon"):
        assert node.write(chunks(), 72) is None
    assert "sending them inline" in caplog.text
    states = heterogeneous_states()[1]
    record = replies_to_record(replies_for(states), node)
    assert set(record.keys()) == {"layout", "data"}


def test_a_block_through_a_file_parses_as_inline_and_goes_back_as_that_file(files, monkeypatch):
    monkeypatch.setenv(shared.MIN_BYTES_ENV, "0")
    _, states = heterogeneous_states()
    results = replies_for(states)
    node = SharedFiles.attach(str(files.path))
    inline, through = replies_to_record(results), replies_to_record(results, node)
    assert set(through.keys()) == {"layout", "file"}
    name, size = file_ref(through["file"])
    assert (files.path / name).read_bytes() == inline["data"].data and size == len(inline["data"].data)
    a, b = BlockReplies(inline, views=True), BlockReplies(through, views=True, files=files)
    assert a.error is None and b.error is None
    for j in states:
        (ra, sa), (rb, sb) = a.parse(j), b.parse(j)
        assert (ra.client, ra.loss, ra.samples) == (rb.client, rb.loss, rb.samples) and tree_equal(sa, sb)
    back = b.states_record()
    assert file_ref(back["file"]) == (name, size)  # the same file, not a copy
    again = record_to_states(back, node)
    assert all(tree_equal(again[j], states[j]) for j in states)
    again[7]["est"]["m"].add_(1)  # the node's copy is its own to write into
    assert tree_equal(b.parse(7)[1], states[7])
    del a, b, back, again, sa, sb, ra, rb
    gc.collect()
    assert not (files.path / name).exists()


@pytest.mark.parametrize("ref", [b'{"name": "../../../etc/passwd", "size": 4}', b'{"name": 3}', b"not json",
                                 b'{"name": "00000000000000000000000000000000", "size": -1}'])
def test_a_bad_file_reference_rejects_its_block(files, ref):
    from flwr.app import ArrayRecord

    from strategies.records import to_array

    _, states = heterogeneous_states()
    record = replies_to_record(replies_for(states))
    bad = ArrayRecord({"layout": record["layout"], "file": to_array(np.frombuffer(ref, dtype=np.uint8))})
    block = BlockReplies(bad, views=True, files=files)
    assert block.error is not None
    with pytest.raises(Exception, match="records"):
        block.parse(7)
    assert BlockReplies(record, views=True, files=None).error is None
    no_dir = BlockReplies(ArrayRecord({"layout": record["layout"], "file": to_array(
        np.frombuffer(b'{"name": "00000000000000000000000000000000", "size": 4}', dtype=np.uint8))}), views=True)
    assert "none was expected" in str(no_dir.error)


def test_a_run_through_files_equals_the_inline_run(monkeypatch):
    """In-process Flower grid, every record through files (the server's states, the nodes' replies,
    states re-sent as they came), partial participation and a fault: the same run, every file gone."""
    from fedgluon.engines import run_inprocess

    monkeypatch.setenv(shared.MIN_BYTES_ENV, "0")
    mapped, written = [], []
    monkeypatch.setattr(SharedFiles, "map", lambda self, *a, _f=SharedFiles.map: mapped.append(a) or _f(self, *a))
    monkeypatch.setattr(SharedFiles, "write", lambda self, *a, _f=SharedFiles.write: written.append(a) or _f(self, *a))
    spec = {"task": {"name": "synthetic", "num_clients": 7, "dim": 8, "classes": 3, "hidden": [8],
                     "mean_samples": 20, "batch_size": 12},
            "algorithm": {"name": "gluon-ef21-mvr", "lr": 0.05, "compressor": {"name": "topk", "ratio": 0.2}},
            "rounds": 5, "seed": 6, "block_size": 3, "participation": 0.8, "faults": {"raise_prob": 0.1}}
    through = run_inprocess(spec, shared_memory=True)
    assert mapped and len(written) > len(mapped)  # replies mapped; states written by the server too
    directory = through.files.path
    assert not directory.exists()
    inline = run_inprocess(spec)
    same_metrics(pd.DataFrame(through.history), pd.DataFrame(inline.history))
    for j in range(7):
        a, b = through.client_states[j], inline.client_states[j]
        flat_a, flat_b = torch.utils._pytree.tree_leaves(a), torch.utils._pytree.tree_leaves(b)
        assert len(flat_a) == len(flat_b) and all(torch.equal(x, y) for x, y in zip(flat_a, flat_b))
