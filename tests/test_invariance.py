"""What a figure depends on: the data and the model, nothing else.

The invariance matrix. Each property below is stated once, with its tolerance, and run over
every image algorithm of ``ALGORITHMS`` (and the backbone options of ``BACKBONES`` that change
the graph). A new algorithm joins every property by being added to ``ALGORITHMS``; where an
algorithm legitimately depends on something a property varies, ``EXCEPTIONS`` names it with the
paper's reason, and docs/runs.md ("What a figure depends on") says so.

Properties (sections below, in this order):
- names and order: class folder names (labels permuted consistently) and file order;
- how the work is split: eval.batch, algo.batching, algo.checkpoint_steps, torchrun processes;
- how the pixels are stored: pickle, PNGs, folders at every image size; EXIF orientation;
- copies: a support image given k times;
- resume: stopped and resumed equals uninterrupted;
- the protocol key: every eval/device option either passes an invariance or is in the key.
"""

from __future__ import annotations

import pytest

# The image algorithms, each with the overrides that make it build on the tiny glyphs used
# here (the options of the matrix in test_matrix.py choose the graph). A new algorithm joins
# every property below by being added here.
ALGORITHMS: dict[str, list[str]] = {
    "protonet": [],
    "matching": [],
    "matching_fce": ["algo=matching", "algo.fce=true"],
    "relation": ["backbone=conv4_relation"],
    "siamese": [],
    "maml": ["algo.eval_inner_steps=1"],
    "fomaml": [],
    "metasgd": [],
    "anil": [],
    "meta_lstm": ["algo.inner_steps=2"],
    "reptile": ["algo.inner_steps=2", "algo.eval_inner_steps=2"],
    "weightgen": [],
    "baseline": [],
    "rfs": [],
}

# Backbone options that change the graph: random layers (dropout, DropBlock) and a pretrained-
# shaped network. Tiny widths; nothing downloaded.
BACKBONES: dict[str, list[str]] = {
    "conv4": ["backbone=conv4", "backbone.hidden=4"],
    "resnet12_dropblock": ["backbone=resnet12", "backbone.widths=[4,4,4,4]",
                           "backbone.keep_prob=0.9"],
    "torchvision": ["backbone=torchvision", "backbone.arch=resnet18", "backbone.weights=null"],
}

# (property, algorithm) -> why the algorithm legitimately depends on what the property varies,
# with the paper that says so. Every entry is listed in docs/runs.md.
EXCEPTIONS: dict[tuple[str, str], str] = {}


def algorithm_overrides(name: str) -> list[str]:
    """The overrides that select algorithm ``name`` of ``ALGORITHMS``."""
    extra = ALGORITHMS[name]
    chosen = [o for o in extra if o.startswith("algo=")]
    return ([] if chosen else [f"algo={name}"]) + extra


def test_the_list_names_every_image_algorithm_of_the_config_tree() -> None:
    from fewshot_cli.config import group_targets

    algos = {o.split("=")[1] for name in ALGORITHMS for o in algorithm_overrides(name)
             if o.startswith("algo=")}
    assert algos | {"rl2"} == set(group_targets("algo"))


def exception(prop: str, name: str) -> None:
    """Skip (with the documented reason) where ``name`` legitimately fails ``prop``."""
    if (prop, name) in EXCEPTIONS:
        pytest.skip(EXCEPTIONS[prop, name])


# ================================================================ names and order
# (section: names and order)

# ================================================================ how the work is split
# (section: how the work is split)

# ================================================================ how the pixels are stored
# (section: how the pixels are stored)
#
# The same images decode to the same tensors whatever the layout (a miniImageNet pickle of
# decoded pixels, its csv and folder layouts of JPEGs, PNGs in dataset=folder, Omniglot's PNGs,
# a user's files given to fewshot predict), at every dataset.image_size (the source size, two
# down-samplings, an up-sampling), and a JPEG with an EXIF orientation decodes as a viewer
# shows it. Tolerance: none, pixel for pixel (torch.equal): every reader and predict decode
# through one function (images.decode_image, one Lanczos resize, images.squash), and the
# lossy step, JPEG decoding, is the same full-scale libjpeg decode on every path. The property
# is of the input tensors, before any algorithm, so it holds for every entry of ALGORITHMS
# alike. Data sets drawn in memory (glyphs) have no files and are not part of it.

PIXEL_SIZES = (84, 42, 32, 100)
PIXEL_CLASSES, PIXEL_IMAGES = 3, 2


def _photos():
    """wnid -> [(JPEG bytes, the pixels a pickle of it holds: uint8 [84, 84, 3])]: smooth
    random colour images, as miniImageNet's JPEGs and Ren et al.'s pickle of them."""
    import io

    import numpy as np
    import torch
    from PIL import Image

    from fewshot_cli.data.miniimagenet import encode_jpeg

    g = torch.Generator().manual_seed(28)
    low = torch.rand(PIXEL_CLASSES * PIXEL_IMAGES, 3, 7, 7, generator=g)
    big = torch.nn.functional.interpolate(low, size=84, mode="bicubic").clamp(0, 1)
    pixels = (big * 255).to(torch.uint8)
    out = {}
    for c in range(PIXEL_CLASSES):
        jpegs = [encode_jpeg(pixels[c * PIXEL_IMAGES + i]) for i in range(PIXEL_IMAGES)]
        out[f"n{c:08d}"] = [(j, np.asarray(Image.open(io.BytesIO(j)).convert("RGB")))
                            for j in jpegs]
    return out


def _layouts(root):
    """The same photos as a miniImageNet pickle, csv and folders layout (train split), a
    dataset=folder tree of PNGs; returns those roots and the support files predict is given."""
    import csv
    import pickle

    import numpy as np
    from PIL import Image

    photos = _photos()
    for name in ("pickle", "csv", "folders", "png"):
        (root / name).mkdir(parents=True)
    with open(root / "csv" / "train.csv", "w", newline="") as f:
        rows = csv.writer(f)
        rows.writerow(["filename", "label"])
        (root / "csv" / "images").mkdir()
        for wnid, images in photos.items():
            (root / "folders" / "train" / wnid).mkdir(parents=True)
            (root / "png" / wnid).mkdir()
            for i, (jpeg, array) in enumerate(images):
                (root / "csv" / "images" / f"{wnid}{i:08d}.jpg").write_bytes(jpeg)
                rows.writerow([f"{wnid}{i:08d}.jpg", wnid])
                (root / "folders" / "train" / wnid / f"{i:08d}.jpg").write_bytes(jpeg)
                Image.fromarray(array).save(root / "png" / wnid / f"{i:08d}.png")
    arrays = [a for images in photos.values() for _, a in images]
    class_dict = {w: list(range(c * PIXEL_IMAGES, (c + 1) * PIXEL_IMAGES))
                  for c, w in enumerate(photos)}
    with open(root / "pickle" / "mini-imagenet-cache-train.pkl", "wb") as f:
        pickle.dump({"image_data": np.stack(arrays), "class_dict": class_dict}, f, protocol=4)
    return {w: sorted((root / "folders" / "train" / w).iterdir()) for w in photos}, \
        {w: sorted((root / "png" / w).iterdir()) for w in photos}


@pytest.mark.parametrize("size", PIXEL_SIZES)
def test_every_layout_and_predict_decode_the_same_tensors(tmp_path, own_cache, size):
    import torch

    from fewshot_cli.data.folder import Folder
    from fewshot_cli.data.miniimagenet import MiniImageNet
    from fewshot_cli.predict import decode_inputs

    jpegs, pngs = _layouts(tmp_path)
    stores = {layout: MiniImageNet(str(tmp_path / layout), image_size=size,
                                   layout=layout).load("train")
              for layout in ("pickle", "csv", "folders")}
    stores["folder of PNGs"] = Folder(str(tmp_path / "png"), image_size=size, channels=3,
                                      min_images=1).store()
    query = [p for files in jpegs.values() for p in files]
    support, queries = decode_inputs(jpegs, query, size, "RGB")
    stores["predict support"] = support
    stores["predict query"] = queries
    png_support, _ = decode_inputs(pngs, query[:1], size, "RGB")
    stores["predict PNG support"] = png_support
    reference = stores.pop("pickle")
    assert reference.images.shape == (PIXEL_CLASSES, PIXEL_IMAGES, 3, size, size)
    for layout, store in stores.items():
        images = store.images.view(reference.images.shape)
        apart = (images.float() - reference.images.float()).abs().mean()
        assert torch.equal(images, reference.images), \
            f"{layout} differs from the pickle at {size} px (mean {apart:.2f} grey levels)"
        if store.digests is not None:  # the same source pixels: the same content digests
            assert torch.equal(store.digests.view(-1), reference.digests.view(-1)), layout


@pytest.mark.parametrize("size", (12, 6, 20))
def test_omniglot_pngs_decode_as_a_folder_and_predict_decode_them(tmp_path, own_cache, size):
    import torch
    from test_omniglot import make_release

    from fewshot_cli.data.folder import Folder
    from fewshot_cli.data.omniglot import Omniglot
    from fewshot_cli.predict import decode_inputs

    root = make_release(tmp_path / "omniglot", zipped=False,
                        names=("images_background_small1", "images_background_small2"))
    train = Omniglot(str(root), split="minimal", image_size=size).load("train")
    folder = root / "images_background_small1"
    files = {f"{a.name}/{c.name}": sorted(c.iterdir()) for a in sorted(folder.iterdir())
             for c in sorted(a.iterdir())}
    mine = Folder(str(folder), image_size=size, channels=1, min_images=1).store()
    support, _ = decode_inputs(files, files[next(iter(files))][:1], size, "L")
    for other in (mine, support):
        assert other.names == [n.split("/", 1)[1] for n in train.names]
        assert torch.equal(other.images, train.images)
        assert torch.equal(other.digests, train.digests)


def _phone_photo(folder):
    """A JPEG as a phone stores a photo taken upright (sideways pixels, EXIF orientation 6),
    and a PNG of what a viewer shows: the same decoded pixels turned 90 degrees clockwise
    (built apart from the decoder: the same JPEG without the tag, then PIL's transpose)."""
    import io

    import numpy as np
    from PIL import Image, ImageDraw

    upright = Image.new("RGB", (40, 24), (230, 220, 200))
    ImageDraw.Draw(upright).rectangle((3, 2, 14, 20), fill=(20, 60, 160))  # left, not right
    ImageDraw.Draw(upright).ellipse((26, 4, 36, 10), fill=(200, 30, 30))   # top, not bottom
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # 24 wide, 40 high
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to show
    folder.mkdir(parents=True, exist_ok=True)
    stored.save(folder / "phone.jpg", quality=95, exif=exif.tobytes())
    plain = io.BytesIO()
    stored.save(plain, format="JPEG", quality=95)
    decoded = Image.fromarray(np.asarray(Image.open(plain).convert("RGB")))
    decoded.transpose(Image.Transpose.ROTATE_270).save(folder / "shown.png")
    decoded.save(folder / "other.png")  # sideways: another support class for predict
    return folder / "phone.jpg", folder / "shown.png"


@pytest.mark.parametrize("size", (24, 12, 48))
def test_a_jpeg_with_exif_orientation_decodes_as_a_viewer_shows_it(tmp_path, own_cache, size):
    import shutil
    from dataclasses import replace

    import torch

    from fewshot_cli.data.folder import Folder
    from fewshot_cli.data.miniimagenet import MiniImageNet
    from fewshot_cli.predict import decode_inputs

    phone, shown = _phone_photo(tmp_path / "photos")
    for split in ("train", "val", "test"):  # dataset=folder and miniImageNet's folders layout
        for name, source in (("a", phone), ("b", shown)):
            (tmp_path / "data" / split / name).mkdir(parents=True)
            shutil.copy(source, tmp_path / "data" / split / name / f"0{source.suffix}")
    readers = {
        "folder": Folder(str(tmp_path / "data"), image_size=size, channels=3,
                         min_images=1).load("train"),
        "miniimagenet folders": MiniImageNet(str(tmp_path / "data"), image_size=size,
                                             layout="folders").load("train"),
    }
    # predict: the phone photo as the query, what a viewer shows it as a support image
    support, query = decode_inputs({"a": [shown], "b": [tmp_path / "photos" / "other.png"]},
                                   [phone], size, "RGB")
    readers["predict"] = replace(query, images=torch.cat([query.images, support.images[:1]]),
                                 digests=torch.cat([query.digests, support.digests[:1]]),
                                 names=["phone", "shown"], counts=None, origin=None)
    for reader, store in readers.items():
        assert store.images.shape[-2:] == (size, size)
        assert torch.equal(store.images[0, 0], store.images[1, 0]), \
            f"{reader} decodes the phone photo sideways (EXIF orientation 6 ignored)"
        assert store.digests[0, 0] == store.digests[1, 0], reader


@pytest.mark.parametrize("value", ["[0,360]", "[90,450]", "[-90,270]", "[0,90,0]"])
def test_a_quarter_turn_named_twice_is_refused_in_one_sentence(fewshot, value):
    from helpers import compose, one_sentence

    from fewshot_cli.data.glyphs import Glyphs
    from fewshot_cli.data.omniglot import Omniglot
    from fewshot_cli.data.store import ClassStore
    from fewshot_cli.errors import FewshotError
    from fewshot_cli.options import RULES, check

    one_sentence(fewshot("data", "dataset=glyphs", f"dataset.rotations={value}"),
                 f"dataset.rotations={value}", "distinct multiples of 90")
    with pytest.raises(FewshotError, match=r"dataset\.rotations=.* must be a list of distinct"):
        check(compose(["dataset=omniglot", f"dataset.rotations={value}"]), RULES["train"])
    degrees = [int(d) for d in value.strip("[]").split(",")]
    for make in (lambda: Glyphs({"train": 2, "val": 2, "test": 2}, rotations=degrees),
                 lambda: Omniglot("nowhere", rotations=degrees, download=False)):
        with pytest.raises(FewshotError, match=r"dataset\.rotations"):
            make()
    import torch
    store = ClassStore(torch.zeros(2, 1, 1, 4, 4, dtype=torch.uint8), ["a", "b"])
    with pytest.raises(FewshotError, match=r"dataset\.rotations"):
        store.rotated(degrees)


def test_predict_refuses_one_image_under_two_support_classes(tmp_path):
    import shutil

    from image_folder import make_image_folder

    from fewshot_cli.errors import FewshotError
    from fewshot_cli.predict import decode_inputs, support_classes

    support = make_image_folder(tmp_path / "support", {"cat": 2, "dog": 2})
    shutil.copy(support / "cat" / "001.png", support / "dog" / "copy.png")
    shutil.copy(support / "dog" / "000.jpg", support / "dog" / "again.jpg")  # one class: fine
    files = support_classes(support)
    with pytest.raises(FewshotError) as err:
        decode_inputs(files, files["cat"][:1], 16, "RGB")
    sentence = str(err.value)
    assert str(support / "cat" / "001.png") in sentence
    assert str(support / "dog" / "copy.png") in sentence
    assert "again.jpg" not in sentence and "\n" not in sentence


def test_a_cross_domain_eval_on_the_runs_training_classes_is_refused(fewshot, tmp_path):
    """Lake et al.'s test alphabets holding three of the glyph run's training characters (as
    236 of Lake's test characters are in Vinyals et al.'s training split) and one drawing of
    a fourth among new drawings."""
    import json

    import torch
    from helpers import ok, one_sentence
    from PIL import Image

    from fewshot_cli.data.glyphs import Glyphs

    classes = ["dataset.classes.train=6", "dataset.classes.val=3", "dataset.classes.test=3"]
    glyphs = ["dataset=glyphs", *classes, "dataset.images_per_class=4", "backbone.hidden=4",
              "train.ways=2", "train.queries=1", "eval.ways=2", "eval.queries=1",
              "train.steps=1", "train.val_every=1", "train.val_episodes=1", "device=cpu"]
    ok(fewshot("train", *glyphs, f"hydra.run.dir={tmp_path / 'run'}"))
    trained = Glyphs({"train": 6, "val": 3, "test": 3}, images_per_class=4).load("train")
    novel = Glyphs({"train": 6, "val": 3, "test": 6}, images_per_class=4, seed=7).load("test")
    root = tmp_path / "omniglot"
    mixed = torch.cat([novel.images[5, :3], trained.images[3, :1]])  # one trained drawing
    chars = {"images_background/Alpha": [novel.images[0]],
             "images_evaluation/Angelic": [novel.images[1], novel.images[2]],
             "images_evaluation/ULOG": [novel.images[3], novel.images[4],
                                        *trained.images[:3], mixed]}
    for alphabet, drawings in chars.items():
        for c, images in enumerate(drawings):
            folder = root / alphabet / f"character{c + 1:02d}"
            folder.mkdir(parents=True)
            for d, image in enumerate(images):
                Image.fromarray(image[0].numpy()).save(folder / f"{c + 1:02d}_{d + 1:02d}.png")
    proc = fewshot("eval", f"ckpt={tmp_path / 'run' / 'best.pt'}", "dataset=omniglot_lake",
                   f"dataset.root={root}", "dataset.download=false", "eval.episodes=2")
    one_sentence(proc, "13 of the 24 test images of dataset=omniglot_lake, in 4 of its 6 classes",
                 "trained on", "not be cross-domain")
    # a record from before image digests were kept: whole classes, by their fingerprints
    record = tmp_path / "run" / "split.json"
    record.write_text(json.dumps({k: v for k, v in json.loads(record.read_text()).items()
                                  if k != "train_images"}))
    proc = fewshot("eval", f"ckpt={tmp_path / 'run' / 'best.pt'}", "dataset=omniglot_lake",
                   f"dataset.root={root}", "dataset.download=false", "eval.episodes=2")
    one_sentence(proc, "12 of the 24 test images of dataset=omniglot_lake, in 3 of its 6 classes")
    assert not (tmp_path / "run" / "results.json").exists() or \
        "omniglot" not in (tmp_path / "run" / "results.json").read_text()

# ================================================================ copies
# (section: copies)

# ================================================================ resume
# (section: resume)

# ================================================================ the protocol key
# (section: the protocol key)
