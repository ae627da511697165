"""trainers.data: tiny files in the real on-disk formats, loaded through the same code path as real data."""
import gzip
import os
import pickle
import struct
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch

from trainers import data
from trainers.data import torchvision_sets
from trainers.config import DataConfig, SyntheticConfig
from trainers.data import DataNotFoundError, augment, load_dataset, normalize, shard_indices

DEBIAN_FASHION = Path("/usr/share/datasets/fashion-mnist")  # where Debian's dataset-fashion-mnist installs it
REAL_OFFLINE = dict(torchvision_sets.OFFLINE_COPIES)


class Log(list):
    def __call__(self, msg: str) -> None:
        self.append(msg)

    def has(self, text: str) -> bool:
        return any(text in line for line in self)


@pytest.fixture(autouse=True)
def isolated(monkeypatch, tmp_path):
    """No test sees the machine's real offline copies or $SWEEPER_DATA_DIR unless it asks."""
    monkeypatch.delenv("SWEEPER_DATA_DIR", raising=False)
    fake = [("Debian's dataset-fashion-mnist", str(tmp_path / "debian"))]
    monkeypatch.setattr(torchvision_sets, "OFFLINE_COPIES", {"fashion-mnist": fake})


@pytest.fixture
def no_md5(monkeypatch):
    """The real CIFAR parser checks md5 sums of the real files; accept any present file instead."""
    import torchvision.datasets.cifar as cifar

    monkeypatch.setattr(cifar, "check_integrity", lambda fpath, md5=None: os.path.isfile(fpath))


def cfg(name, root, **kw):
    kw.setdefault("split", "test")
    kw.setdefault("download", False)
    return DataConfig(dataset=name, data_dir=str(root), **kw)


def images(n, c, h, w, seed):
    return np.random.default_rng(seed).integers(0, 256, (n, c, h, w), dtype=np.uint8)


def dump(path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as fh:
        pickle.dump(obj, fh)


def write_cifar100(root, n_train=12, n_test=6):
    folder = root / "cifar-100-python"
    x_tr, x_te = images(n_train, 3, 32, 32, 1), images(n_test, 3, 32, 32, 2)
    y_tr, y_te = [(7 * i) % 100 for i in range(n_train)], [99 - i for i in range(n_test)]
    # The keys torchvision reads after pickle.load(encoding="latin1"): data (N x 3072, CHW rows), fine_labels.
    dump(folder / "train", {"data": x_tr.reshape(n_train, -1), "fine_labels": y_tr, "coarse_labels": [0] * n_train})
    dump(folder / "test", {"data": x_te.reshape(n_test, -1), "fine_labels": y_te, "coarse_labels": [0] * n_test})
    dump(folder / "meta", {"fine_label_names": [f"c{i}" for i in range(100)], "coarse_label_names": ["s"] * 20})
    return x_tr, y_tr, x_te, y_te


def write_cifar10(root, per_batch=3, n_test=4):
    folder = root / "cifar-10-batches-py"
    xs, ys = [], []
    for b in range(1, 6):
        x, y = images(per_batch, 3, 32, 32, b), [(b + i) % 10 for i in range(per_batch)]
        dump(folder / f"data_batch_{b}", {"data": x.reshape(per_batch, -1), "labels": y})
        xs.append(x)
        ys += y
    x_te, y_te = images(n_test, 3, 32, 32, 9), list(range(n_test))
    dump(folder / "test_batch", {"data": x_te.reshape(n_test, -1), "labels": y_te})
    dump(folder / "batches.meta", {"label_names": [f"c{i}" for i in range(10)]})
    return np.concatenate(xs), ys, x_te, y_te


def write_idx(path, array, gz):
    """IDX: magic 0x0000 0x08 (uint8) ndim, then big-endian int32 dims, then the raw bytes."""
    payload = struct.pack(">I", 0x0800 + array.ndim) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    if gz:
        path = path.with_name(path.name + ".gz")
        payload = gzip.compress(payload)
    path.write_bytes(payload)


def write_fashion(folder, gz, n_train=10, n_test=5):
    x_tr, x_te = images(n_train, 1, 28, 28, 3)[:, 0], images(n_test, 1, 28, 28, 4)[:, 0]
    y_tr, y_te = np.arange(n_train, dtype=np.uint8) % 10, np.arange(n_test, dtype=np.uint8)[::-1].copy()
    for stem, arr in [("train-images-idx3-ubyte", x_tr), ("train-labels-idx1-ubyte", y_tr),
                      ("t10k-images-idx3-ubyte", x_te), ("t10k-labels-idx1-ubyte", y_te)]:
        write_idx(folder / stem, arr, gz)
    return x_tr, y_tr, x_te, y_te


def assert_roundtrip(ds, x_tr, y_tr, x_te, y_te, shape):
    assert ds.train_x.dtype == torch.uint8 and ds.train_y.dtype == torch.int64
    assert ds.eval_x.dtype == torch.uint8 and ds.eval_y.dtype == torch.int64
    assert tuple(ds.train_x.shape[1:]) == shape and ds.channels == shape[0] and ds.image_size == shape[1]
    assert torch.equal(ds.train_x, torch.as_tensor(np.asarray(x_tr)).reshape(-1, *shape))
    assert ds.train_y.tolist() == [int(v) for v in y_tr]
    assert torch.equal(ds.eval_x, torch.as_tensor(np.asarray(x_te)).reshape(-1, *shape))
    assert ds.eval_y.tolist() == [int(v) for v in y_te]


# --------------------------------------------------------------------------------------------------
# Formats


def test_cifar100_pickles_roundtrip_and_cache(tmp_path, no_md5):
    expected = write_cifar100(tmp_path)
    log = Log()
    ds = load_dataset(cfg("cifar100", tmp_path), seed=0, log=log)
    assert_roundtrip(ds, *expected, shape=(3, 32, 32))
    assert ds.num_classes == 100 and ds.source == str(tmp_path / "cifar-100-python")
    assert log.has("parsing CIFAR-100 from") and (tmp_path / "cifar100.pt").is_file()

    log2 = Log()
    again = load_dataset(cfg("cifar100", tmp_path), seed=0, log=log2)
    assert log2.has(f"loading cifar100 from cache {tmp_path / 'cifar100.pt'}") and not log2.has("parsing")
    assert again.source.startswith("cache ")
    assert_roundtrip(again, *expected, shape=(3, 32, 32))


def test_cifar10_roundtrip(tmp_path, no_md5):
    expected = write_cifar10(tmp_path)
    ds = load_dataset(cfg("cifar10", tmp_path), seed=0, log=Log())
    assert len(ds.train_x) == 15 and ds.num_classes == 10
    assert_roundtrip(ds, *expected, shape=(3, 32, 32))


def test_cifar_md5_mismatch_is_reported_not_crashing(tmp_path):
    write_cifar100(tmp_path)  # real md5 checks on: the tiny files fail them
    with pytest.raises(DataNotFoundError, match="unusable .*corrupted"):
        load_dataset(cfg("cifar100", tmp_path), seed=0, log=Log())


@pytest.mark.parametrize("gz", [False, True])
def test_fashion_torchvision_layout(tmp_path, gz):
    expected = write_fashion(tmp_path / "FashionMNIST" / "raw", gz)
    ds = load_dataset(cfg("fashion-mnist", tmp_path), seed=0, log=Log())
    assert_roundtrip(ds, *expected, shape=(1, 28, 28))
    assert ds.num_classes == 10


@pytest.mark.parametrize("gz", [True, False])
def test_fashion_debian_layout(tmp_path, gz):
    expected = write_fashion(tmp_path / "debian", gz)  # the autouse fixture points the offline copy here
    log = Log()
    ds = load_dataset(cfg("fashion-mnist", tmp_path / "data"), seed=0, log=log)
    assert_roundtrip(ds, *expected, shape=(1, 28, 28))
    assert log.has("no local copy in") and log.has("using Debian's dataset-fashion-mnist at")
    assert "Debian" in ds.source and (tmp_path / "data" / "fashion-mnist.pt").is_file()
    assert list((tmp_path / "debian").iterdir()) and not (tmp_path / "data" / "FashionMNIST").exists()


def test_incomplete_folder_falls_through_to_offline_copy(tmp_path):
    raw = tmp_path / "data" / "FashionMNIST" / "raw"
    write_idx(raw / "train-images-idx3-ubyte", images(2, 1, 28, 28, 0)[:, 0], gz=False)  # 3 files missing
    expected = write_fashion(tmp_path / "debian", gz=True)
    log = Log()
    ds = load_dataset(cfg("fashion-mnist", tmp_path / "data"), seed=0, log=log)
    assert log.has("unusable") and "Debian" in ds.source
    assert_roundtrip(ds, *expected, shape=(1, 28, 28))


def test_corrupt_cache_is_reparsed(tmp_path):
    expected = write_fashion(tmp_path / "FashionMNIST" / "raw", gz=False)
    (tmp_path / "fashion-mnist.pt").write_bytes(b"not a torch file")
    log = Log()
    ds = load_dataset(cfg("fashion-mnist", tmp_path), seed=0, log=log)
    assert log.has("unreadable") and ds.source == str(tmp_path / "FashionMNIST" / "raw")
    assert_roundtrip(ds, *expected, shape=(1, 28, 28))
    assert load_dataset(cfg("fashion-mnist", tmp_path), seed=0, log=Log()).source.startswith("cache ")


# --------------------------------------------------------------------------------------------------
# Missing data and downloads


def test_not_found_names_every_place_tried(tmp_path):
    with pytest.raises(DataNotFoundError) as err:
        load_dataset(cfg("fashion-mnist", tmp_path), seed=0, log=Log())
    msg = str(err.value)
    for place in (tmp_path / "fashion-mnist.pt", tmp_path / "FashionMNIST" / "raw", tmp_path / "debian"):
        assert str(place) in msg
    assert "download: skipped" in msg and "apt-get install dataset-fashion-mnist" in msg

    with pytest.raises(DataNotFoundError) as err:
        load_dataset(cfg("cifar100", tmp_path), seed=0, log=Log())
    assert str(tmp_path / "cifar100.pt") in str(err.value) and str(tmp_path / "cifar-100-python") in str(err.value)


def test_unreachable_download_falls_through_in_order(tmp_path, monkeypatch):
    import torchvision.datasets as tvd

    calls = []

    def offline(self):
        calls.append(type(self).__name__)
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(tvd.FashionMNIST, "download", offline)
    log = Log()
    with pytest.raises(DataNotFoundError) as err:
        load_dataset(cfg("fashion-mnist", tmp_path, download=True), seed=0, log=log)
    assert calls == ["FashionMNIST"]
    assert log.has("no local copy; downloading Fashion-MNIST with torchvision") and log.has("download failed")
    msg = str(err.value)
    order = [msg.index(s) for s in ("fashion-mnist.pt", "FashionMNIST/raw: not found", "Debian's", "download into")]
    assert order == sorted(order) and "URLError" in msg and "name resolution" in msg


def test_download_path_uses_torchvision(tmp_path, monkeypatch, no_md5):
    import torchvision.datasets as tvd

    expected = {}
    def fake_download(self):  # what torchvision's download leaves behind, minus the network
        expected["files"] = write_cifar100(Path(self.root))

    monkeypatch.setattr(tvd.CIFAR100, "download", fake_download)
    log = Log()
    ds = load_dataset(cfg("cifar100", tmp_path / "fresh", download=True), seed=0, log=log)
    assert log.has("downloading CIFAR-100 with torchvision into") and "downloaded" in ds.source
    assert_roundtrip(ds, *expected["files"], shape=(3, 32, 32))


def test_data_root_precedence(monkeypatch):
    assert data.data_root(DataConfig()) == Path("data")
    monkeypatch.setenv("SWEEPER_DATA_DIR", "/srv/d")
    assert data.data_root(DataConfig()) == Path("/srv/d")
    assert data.data_root(DataConfig(data_dir="/x")) == Path("/x")


# --------------------------------------------------------------------------------------------------
# Splits, subset, statistics


def small_synthetic(**kw):
    return DataConfig(dataset="synthetic", synthetic=SyntheticConfig(train_size=100, test_size=30, channels=2,
                                                                        image_size=8, classes=5), **kw)


def test_val_split_is_seeded_and_disjoint():
    a = load_dataset(small_synthetic(), seed=1, log=Log())
    assert len(a.train_x) == 80 and len(a.eval_x) == 20
    full = load_dataset(small_synthetic(split="test"), seed=1, log=Log())
    rows = {bytes(r.numpy()) for r in full.train_x}  # synthetic images are distinct: use them as ids
    tr, ev = {bytes(r.numpy()) for r in a.train_x}, {bytes(r.numpy()) for r in a.eval_x}
    assert len(tr) == 80 and len(ev) == 20 and not tr & ev and tr | ev == rows
    b = load_dataset(small_synthetic(), seed=1, log=Log())
    c = load_dataset(small_synthetic(), seed=2, log=Log())
    assert torch.equal(a.train_x, b.train_x) and torch.equal(a.eval_y, b.eval_y)
    assert not torch.equal(a.eval_x, c.eval_x)


def test_test_split_and_subset():
    full = load_dataset(small_synthetic(split="test"), seed=0, log=Log())
    assert len(full.train_x) == 100 and len(full.eval_x) == 30
    log = Log()
    sub = load_dataset(small_synthetic(split="test", subset=10), seed=0, log=log)
    assert torch.equal(sub.train_x, full.train_x[:10]) and len(sub.eval_x) == 30 and log.has("first 10 of 100")
    log = Log()
    big = load_dataset(small_synthetic(split="val", subset=1000), seed=0, log=log)
    assert len(big.train_x) == 80 and log.has("keeping all")


def test_mean_std_match_training_part():
    ds = load_dataset(small_synthetic(subset=50), seed=0, log=Log())
    x = ds.train_x.double() / 255
    assert len(ds.mean) == 2
    assert ds.mean == pytest.approx(x.mean(dim=(0, 2, 3)).tolist(), abs=1e-12)
    assert ds.std == pytest.approx(x.std(dim=(0, 2, 3), unbiased=False).tolist(), abs=1e-12)


def test_synthetic_is_deterministic_and_learnable_shape():
    c = small_synthetic(split="test")
    a, b = load_dataset(c, seed=0, log=Log()), load_dataset(c, seed=123, log=Log())
    assert torch.equal(a.train_x, b.train_x) and torch.equal(a.eval_y, b.eval_y)  # run seed does not matter
    assert a.train_x.shape == (100, 2, 8, 8) and a.eval_x.shape == (30, 2, 8, 8) and a.num_classes == 5
    assert set(a.train_y.tolist()) == set(range(5)) == set(a.eval_y.tolist())
    assert a.source == "synthetic"
    # learnable: nearest class mean (from train) classifies the test set well above chance
    means = torch.stack([a.train_x[a.train_y == k].float().mean(0) for k in range(5)])
    pred = torch.cdist(a.eval_x.float().flatten(1), means.flatten(1)).argmin(1)
    assert (pred == a.eval_y).float().mean() > 0.9


def test_dataset_to_moves_everything():
    ds = load_dataset(small_synthetic(), seed=0, log=Log())
    moved = ds.to("cpu")
    assert moved is not ds and moved.mean == ds.mean and moved.train_x.device.type == "cpu"


# --------------------------------------------------------------------------------------------------
# augment / normalize


def distinct_batch(b=6, c=2, h=5, w=5):
    return (torch.arange(b * c * h * w) % 251 + 1).to(torch.uint8).view(b, c, h, w)  # nonzero, distinct per image


def test_augment_identity_and_reproducible():
    x = distinct_batch()
    assert augment(x, torch.Generator().manual_seed(0), 0, False) is x
    a = augment(x, torch.Generator().manual_seed(5), 2, True)
    b = augment(x, torch.Generator().manual_seed(5), 2, True)
    assert torch.equal(a, b) and a.dtype == torch.uint8 and a.shape == x.shape
    assert any(not torch.equal(a, augment(x, torch.Generator().manual_seed(s), 2, True)) for s in range(6, 10))


def test_augment_flip_only_mirrors():
    x = distinct_batch(b=64)
    out = augment(x, torch.Generator().manual_seed(0), 0, True)
    flipped = [torch.equal(o, xi.flip(-1)) for o, xi in zip(out, x)]
    kept = [torch.equal(o, xi) for o, xi in zip(out, x)]
    assert all(f != k for f, k in zip(flipped, kept))  # each sample is exactly one of the two
    assert 10 < sum(flipped) < 54


def test_augment_crop_is_window_of_padded_input():
    import torch.nn.functional as F

    x, p = distinct_batch(b=32), 2
    out = augment(x, torch.Generator().manual_seed(1), p, True)
    padded = F.pad(x, (p,) * 4)
    h, w = x.shape[2:]
    seen_offsets = set()
    for i in range(len(x)):
        windows = [(dy, dx) for dy in range(2 * p + 1) for dx in range(2 * p + 1)
                   if any(torch.equal(out[i], win) for win in (padded[i, :, dy:dy + h, dx:dx + w],
                                                              padded[i, :, dy:dy + h, dx:dx + w].flip(-1)))]
        assert len(windows) == 1, f"sample {i} is not exactly one window of the padded input"
        seen_offsets.add(windows[0])
    assert len(seen_offsets) > 5  # offsets really vary


def test_normalize_matches_formula():
    x = torch.randint(0, 256, (4, 3, 6, 6), dtype=torch.uint8)
    mean, std = torch.tensor([0.5, 0.4, 0.3]).view(1, 3, 1, 1), torch.tensor([0.25, 0.2, 0.3]).view(1, 3, 1, 1)
    out = normalize(x, mean, std)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, (x.float() / 255 - mean) / std, rtol=1e-5, atol=1e-5)
    assert normalize(x, mean, std, dtype=torch.bfloat16).dtype == torch.bfloat16
    torch.testing.assert_close(normalize(x, (0.5, 0.4, 0.3), (0.25, 0.2, 0.3)), out)


# --------------------------------------------------------------------------------------------------
# shard_indices


def is_partition(shards, n):
    return sorted(torch.cat(shards).tolist()) == list(range(n))


def test_shards_contiguous():
    shards = shard_indices(10, 3, "contiguous", seed=0)
    assert [s.tolist() for s in shards] == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]


def test_shards_random_and_reshuffle():
    r0 = shard_indices(100, 4, "random", seed=0)
    assert is_partition(r0, 100) and [len(s) for s in r0] == [25] * 4
    assert all(torch.equal(a, b) for a, b in zip(r0, shard_indices(100, 4, "random", seed=0, epoch=3)))
    assert not torch.equal(r0[0], shard_indices(100, 4, "random", seed=1)[0])
    e0, e1 = shard_indices(100, 4, "reshuffle", seed=0, epoch=0), shard_indices(100, 4, "reshuffle", seed=0, epoch=1)
    assert is_partition(e0, 100) and is_partition(e1, 100) and not torch.equal(e0[0], e1[0])
    assert all(torch.equal(a, b) for a, b in zip(e1, shard_indices(100, 4, "reshuffle", seed=0, epoch=1)))


def test_shards_validation():
    with pytest.raises(ValueError, match="workers"):  # the dataset's size is known only once it is loaded
        shard_indices(3, 4, "contiguous", seed=0)


# --------------------------------------------------------------------------------------------------
# Real data, when Debian's package is installed


@pytest.mark.skipif(not DEBIAN_FASHION.is_dir(), reason="apt-get install dataset-fashion-mnist")
def test_real_fashion_mnist_from_debian(tmp_path, monkeypatch):
    monkeypatch.setattr(torchvision_sets, "OFFLINE_COPIES", REAL_OFFLINE)
    ds = load_dataset(cfg("fashion-mnist", tmp_path), seed=0, log=Log())
    assert ds.train_x.shape == (60000, 1, 28, 28) and ds.eval_x.shape == (10000, 1, 28, 28)
    assert ds.train_y.bincount().tolist() == [6000] * 10
    assert ds.mean[0] == pytest.approx(0.2860, abs=1e-3) and ds.std[0] == pytest.approx(0.3530, abs=1e-3)
    again = load_dataset(cfg("fashion-mnist", tmp_path, split="val"), seed=0, log=Log())
    assert again.source.startswith("cache ") and len(again.train_x) == 48000 and len(again.eval_x) == 12000
