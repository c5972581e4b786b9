import gzip

import numpy as np
import pytest

from fedgen import data as fdata
from fedgen.data import DataError, load_mnist, make_glyphs, partition, to_tensors


@pytest.fixture(scope="module")
def labels(mnist_dir):
    return load_mnist(mnist_dir, "train", download=False).labels


def test_mnist_loads_from_gzip_with_known_class_counts(mnist_dir):
    train = load_mnist(mnist_dir, "train", download=False)
    test = load_mnist(mnist_dir, "test", download=False)
    assert train.images.shape == (60000, 28, 28) and train.images.dtype == np.uint8
    assert test.images.shape == (10000, 28, 28)
    counts = np.bincount(train.labels, minlength=10).tolist()
    assert counts == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]


def test_mnist_loads_raw_idx(tmp_path, mnist_dir):
    for name in ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        (tmp_path / name).write_bytes(gzip.decompress((mnist_dir / f"{name}.gz").read_bytes()))
    raw = load_mnist(tmp_path, "test", download=False)
    ref = load_mnist(mnist_dir, "test", download=False)
    assert np.array_equal(raw.images, ref.images) and np.array_equal(raw.labels, ref.labels)


def test_missing_mnist_without_download_says_where(tmp_path):
    with pytest.raises(DataError) as info:
        load_mnist(tmp_path, "train", download=False)
    assert str(tmp_path) in str(info.value) and "FEDGEN_DATA_DIR" in str(info.value)


def test_failed_download_says_where_to_put_files(tmp_path, monkeypatch):
    # Nothing listens on port 9 of loopback: the same path as a machine without network.
    monkeypatch.setattr(fdata, "MNIST_MIRRORS", ("http://127.0.0.1:9/",))
    with pytest.raises(DataError) as info:
        load_mnist(tmp_path, "train", download=True)
    msg = str(info.value)
    assert "could not download" in msg and str(tmp_path) in msg


def test_truncated_idx_is_reported(tmp_path, mnist_dir):
    name = "t10k-labels-idx1-ubyte"
    full = gzip.decompress((mnist_dir / f"{name}.gz").read_bytes())
    (tmp_path / name).write_bytes(full[:-10])
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(
        (mnist_dir / "t10k-images-idx3-ubyte.gz").read_bytes()
    )
    with pytest.raises(DataError, match="truncated"):
        load_mnist(tmp_path, "test", download=False)


def test_glyphs_are_deterministic_balanced_and_distinct_per_class():
    a = make_glyphs(20, seed=3)
    make_glyphs.cache_clear()  # a second draw, not the process's cached one
    b = make_glyphs(20, seed=3)
    assert a is not b
    assert np.array_equal(a.images, b.images) and np.array_equal(a.labels, b.labels)
    assert np.bincount(a.labels).tolist() == [20] * 10
    means = np.stack([a.images[a.labels == c].mean(0) for c in range(10)])
    # Class-mean images differ pairwise: the classes are learnable, not noise.
    dists = np.linalg.norm((means[:, None] - means[None]).reshape(10, 10, -1), axis=-1)
    assert dists[~np.eye(10, dtype=bool)].min() > 50
    test = make_glyphs(20, seed=3, split="test")
    assert not np.array_equal(test.images[:20], a.images[:20])


def test_a_process_draws_the_glyphs_once_and_shares_them_read_only():
    make_glyphs.cache_clear()
    first = make_glyphs(3, seed=7)
    assert make_glyphs(3, seed=7) is first and make_glyphs.cache_info().hits == 1
    with pytest.raises(ValueError, match="read-only"):
        first.images[0, 0, 0] = 1
    with pytest.raises(ValueError, match="read-only"):
        first.labels[0] = 1
    # What callers get to change is theirs: a subset and the tensors are copies.
    part = first.subset(np.arange(5))
    part.images[0, 0, 0] = 255
    _, labels = to_tensors(first)
    labels[0] = 9 - labels[0]
    assert first.images[0, 0, 0] != 255 and first.labels[0] != labels[0]


@pytest.mark.parametrize("method", ["iid", "dirichlet", "shards"])
def test_partitions_disjoint_complete_deterministic(labels, method):
    parts = partition(labels, 10, method, seed=1, alpha=0.5, shards_per_client=2)
    allidx = np.concatenate(parts)
    assert len(parts) == 10
    assert len(allidx) == len(labels) and len(np.unique(allidx)) == len(
        labels
    )  # disjoint, complete
    again = partition(labels, 10, method, seed=1, alpha=0.5, shards_per_client=2)
    assert all(np.array_equal(x, y) for x, y in zip(parts, again, strict=True))
    other = partition(labels, 10, method, seed=2, alpha=0.5, shards_per_client=2)
    assert not all(np.array_equal(x, y) for x, y in zip(parts, other, strict=True))


def _mean_label_skew(labels, parts):
    # Mean total-variation distance between each client's label mix and the global one.
    glob = np.bincount(labels, minlength=10) / len(labels)
    return float(
        np.mean(
            [
                0.5 * np.abs(np.bincount(labels[p], minlength=10) / len(p) - glob).sum()
                for p in parts
            ]
        )
    )


def test_dirichlet_small_alpha_is_skewed(labels):
    iid = _mean_label_skew(labels, partition(labels, 10, "iid", seed=0))
    skewed = _mean_label_skew(labels, partition(labels, 10, "dirichlet", seed=0, alpha=0.1))
    mild = _mean_label_skew(labels, partition(labels, 10, "dirichlet", seed=0, alpha=100.0))
    assert iid < 0.05
    assert skewed > 0.5  # most of each client's mass sits on a few labels
    assert mild < skewed / 3


def test_shards_give_few_labels_per_client(labels):
    parts = partition(labels, 10, "shards", seed=0, shards_per_client=2)
    assert max(len(np.unique(labels[p])) for p in parts) <= 4


def test_more_clients_than_examples_is_an_error():
    with pytest.raises(DataError, match="every client needs data"):
        partition(np.zeros(3, dtype=np.int64), 5)


def test_a_machine_draws_a_glyph_set_once_and_reads_it_back(tmp_path, monkeypatch):
    from fedgen import data as data_module

    monkeypatch.setenv("FEDGEN_CACHE_DIR", str(tmp_path))
    make_glyphs.cache_clear()
    drawn = make_glyphs(100, seed=11)  # 1,000 glyphs: worth a file
    (path,) = (tmp_path / "glyphs").iterdir()
    assert path.name == f"glyphs-v{data_module.GLYPHS_VERSION}-train-seed11-100.npz"

    def no_drawing(*args):
        raise AssertionError("drew a glyph that was cached")

    monkeypatch.setattr(data_module, "_draw_glyph", no_drawing)
    make_glyphs.cache_clear()  # as a fresh process would
    read = make_glyphs(100, seed=11)
    assert np.array_equal(read.images, drawn.images) and np.array_equal(read.labels, drawn.labels)
    assert not read.images.flags.writeable
    # Another seed or split is another set.
    with pytest.raises(AssertionError, match="drew a glyph"):
        make_glyphs(100, seed=12)


@pytest.mark.parametrize("damage", ["truncated", "not a zip", "wrong labels"])
def test_a_damaged_glyph_file_is_drawn_again_and_replaced(tmp_path, monkeypatch, damage):
    monkeypatch.setenv("FEDGEN_CACHE_DIR", str(tmp_path))
    make_glyphs.cache_clear()
    good = make_glyphs(100, seed=11)
    (path,) = (tmp_path / "glyphs").iterdir()
    whole = path.read_bytes()
    if damage == "truncated":
        path.write_bytes(whole[: len(whole) // 2])
    elif damage == "not a zip":
        path.write_text("hello")
    else:
        np.savez_compressed(path, images=good.images, labels=np.zeros(len(good), np.int64))
    make_glyphs.cache_clear()
    again = make_glyphs(100, seed=11)
    assert np.array_equal(again.images, good.images) and np.array_equal(again.labels, good.labels)
    make_glyphs.cache_clear()
    with np.load(path) as npz:  # rewritten whole
        assert np.array_equal(npz["labels"], good.labels)


def test_glyphs_need_no_writable_cache_and_small_sets_no_file(tmp_path, monkeypatch):
    blocked = tmp_path / "file"
    blocked.write_text("a file where the cache folder would go")
    monkeypatch.setenv("FEDGEN_CACHE_DIR", str(blocked))
    make_glyphs.cache_clear()
    assert len(make_glyphs(100, seed=11)) == 1000  # drawn, the write failed quietly
    monkeypatch.setenv("FEDGEN_CACHE_DIR", str(tmp_path / "cache"))
    make_glyphs.cache_clear()
    assert len(make_glyphs(20, seed=11)) == 200
    assert not (tmp_path / "cache").exists()  # 200 glyphs: drawn faster than read
