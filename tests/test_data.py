import gzip
import shutil

import pytest
import torch

from smolcluster.data import digits, mnist, text
from smolcluster.data.sharding import Sharder
from smolcluster.errors import ConfigError, DataError


def test_digits_are_real_8x8_images_with_fixed_split():
    tx, ty, vx, vy = digits.load()
    assert tx.shape[1] == 64 and len(tx) + len(vx) == 1797
    assert set(ty.tolist()) == set(range(10))
    tx2, _, vx2, _ = digits.load()
    assert torch.equal(vx, vx2) and torch.equal(tx, tx2)
    # read straight from scikit-learn's file (no sklearn import in the run's processes): its own loader's images
    from sklearn.datasets import load_digits
    ref = load_digits()
    perm = torch.randperm(1797, generator=torch.Generator().manual_seed(1234))  # the fixed split's order
    want = (torch.tensor(ref.data, dtype=torch.float32) / 16.0 - 0.3) / 0.4
    assert torch.equal(torch.cat([vx, tx]), want[perm])
    assert torch.equal(torch.cat([vy, ty]), torch.tensor(ref.target)[perm])


def test_mnist_reads_the_real_subset(mnist_root):
    tx, ty, vx, vy = mnist.load(mnist_root)
    assert tx.shape == (19000, 784) and vx.shape == (10000, 784)
    assert ty.max() == 9 and ty.min() == 0
    # normalised with the usual MNIST mean/std: the training mean is close to 0
    assert abs(float(tx.mean())) < 0.05


def test_mnist_missing_directory_names_it_and_the_fix(tmp_path):
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte.gz not found in .*data.root"):
        mnist.load(tmp_path / "nowhere")


def test_mnist_truncated_file_is_named(tmp_path, mnist_root):
    for f in mnist_root.iterdir():
        shutil.copy(f, tmp_path / f.name)
    raw = gzip.decompress((mnist_root / "t10k-labels-idx1-ubyte.gz").read_bytes())
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(raw[:5000]))
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte.gz is truncated"):
        mnist.load(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(b"not gzip at all")
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte.gz is not a readable"):
        mnist.load(tmp_path)


def test_sharding_union_is_the_global_batch_and_deterministic():
    s = Sharder(1000, [32, 16, 16], seed=3)
    for step in (0, 5, s.steps_per_epoch + 2):
        parts = [s.indices(step, r) for r in range(3)]
        assert [len(p) for p in parts] == [32, 16, 16]
        assert torch.equal(torch.cat(parts), s.global_indices(step))
        assert len(set(torch.cat(parts).tolist())) == 64  # no sample twice in one step
    assert torch.equal(Sharder(1000, [32, 16, 16], seed=3).indices(7, 1), s.indices(7, 1))
    assert not torch.equal(Sharder(1000, [32, 16, 16], seed=4).indices(7, 1), s.indices(7, 1))
    # one epoch visits every sample once
    seen = torch.cat([s.global_indices(i) for i in range(s.steps_per_epoch)])
    assert len(set(seen.tolist())) == s.steps_per_epoch * 64


def test_global_batch_larger_than_data_is_a_config_error():
    with pytest.raises(ConfigError, match="train.batch_size"):
        Sharder(10, [8, 8], seed=0)


def test_text_embedded_corpus_and_bpe_tokenizer_cached(tmp_path):
    corpus = text.embedded_corpus()
    assert len(corpus) > 100_000
    tok = text.get_tokenizer(corpus[:50_000], "bpe", vocab_size=500, cache_dir=str(tmp_path))
    assert tok.vocab_size == 500 and tok.eos_id is not None
    sample = "The with statement is used to wrap the execution of a block."
    assert tok.decode(tok.encode(sample)) == sample
    assert len(list(tmp_path.glob("bpe-500-*.json"))) == 1
    again = text.get_tokenizer(corpus[:50_000], "bpe", vocab_size=500, cache_dir=str(tmp_path))
    assert again.encode(sample) == tok.encode(sample)


def test_text_windows_are_shifted_by_one():
    ids = torch.arange(25)
    x, y = text.windows(ids, 6)
    assert x.shape == (4, 6) and torch.equal(y, x + 1)
    with pytest.raises(DataError, match="block_size"):
        text.windows(torch.arange(5), 6)


def test_missing_text_file_is_named(tmp_path):
    with pytest.raises(DataError, match="data.path=.*no such file"):
        text.read_corpus(str(tmp_path / "missing.txt"))


@pytest.fixture
def mirror(mnist_root):
    """A real HTTP mirror on loopback serving the shared MNIST files, as the public mirror would."""
    import functools
    import http.server
    import threading

    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(mnist_root))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()


def test_missing_mnist_files_are_downloaded_checked_and_kept(tmp_path, mnist_root, mirror):
    root = tmp_path / "mnist"
    tx, ty, vx, vy = mnist.load(root, download=True, mirror=mirror)
    assert tx.shape == (19000, 784) and vx.shape == (10000, 784)
    assert sorted(p.name for p in root.iterdir()) == sorted(f.name for f in mnist_root.iterdir() if f.suffix == ".gz")
    assert torch.equal(tx, mnist.load(mnist_root)[0])  # byte for byte what the mirror holds


def test_a_failed_or_truncated_download_names_the_file_and_the_fix_and_leaves_nothing(tmp_path, mnist_root):
    import socket

    with socket.socket() as s:  # a port nobody listens on: "offline"
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}/"
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte.gz not found in .* download from .* failed.*data.root=DIR"):
        mnist.load(tmp_path / "a", download=True, mirror=dead)
    assert not (tmp_path / "a").exists()  # data.root may be a typo: nothing is created for it
    half = tmp_path / "half"  # a mirror whose file is cut short
    half.mkdir()
    for f in mnist_root.iterdir():
        (half / f.name).write_bytes(f.read_bytes()[: 1000 if "train-images" in f.name else None])
    import functools
    import http.server
    import threading

    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(half))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with pytest.raises(DataError, match="train-images-idx3-ubyte.gz .*failed"):
            mnist.load(tmp_path / "b", download=True, mirror=f"http://127.0.0.1:{server.server_address[1]}/")
    finally:
        server.shutdown()
    assert not list((tmp_path / "b").glob("train-images*"))  # the cut file never landed
