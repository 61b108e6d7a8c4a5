"""The kinds of bad input the command fuzz tries (``tests/integration/test_fuzz_cli.py``, issue 18).

Every kind is one option, file or stream a new user can get wrong, across every command; a
hypothesis strategy draws its concrete cases (the number, text or bytes). Option values are
drawn from sets every field refuses (text in a number, NaN, a negative count, a value past the
documented upper bound, the wrong JSON type in --config), so each case ends before any
training: the fuzz stays seconds per hundred cases. Workspace layout (``test_fuzz_cli.workspace``):
``{ws}/data`` a smoke embedded set, ``{ws}/run`` a trained smoke run, ``{ws}/model`` its export,
``{ws}/images`` input images, ``{ws}/npy`` scores and targets, ``{ws}/cache`` a built cache.
"""

from __future__ import annotations

import dataclasses
import json
import math
import string
import typing

from fuzz_harness import Case, Kind, Special
from hypothesis import strategies as st

from fastmlgan import config as fconfig
from fastmlgan.config import BACKBONES, BOOL_WORDS, PRESETS

TRAIN = ["--preset", "smoke", "--out", "{case}/run", "--data.root", "{ws}/data", "--data.embedded_num_val", "64",
         "--train.max_steps_per_epoch", "4"]
CHECK = ["--preset", "smoke", "--data.root", "{ws}/data", "--data.embedded_num_val", "64"]
FIFO, DIR = Special("fifo"), Special("dir")

CHOICES = {
    "data.dataset": ("embedded", "coco", "nuswide", "list", "features", "labelsets"),
    "data.on_bad_image": ("skip", "error"), "data.backend": ("auto", "dali", "torchvision-gpu", "torch", "cache"),
    "data.cache_device": ("cpu", "cuda"), "data.dali_decode": ("full", "roi"), "data.nuswide_split": ("paper", "official"),
    "model.backbone": BACKBONES, "gan.penalty": ("explicit", "autograd"), "precision.amp": ("auto", "bf16", "fp16", "none"),
    "compile.mode": ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"),
    "dist.backend": ("auto", "nccl", "gloo"),
}
# The documented upper bounds (config.py): above them a value is refused by name.
INT_MAX = {"data.image_size": 4096, "data.num_workers": 256, "data.num_threads": 1024, "data.embedded_num_train": 10**7,
           "data.embedded_num_val": 10**7, "data.embedded_image_size": 4096, "model.width": 2**16, "model.depth": 1000,
           "gan.d_steps": 1000, "gan.proj_dim": 2**16, "gan.hidden_dim": 2**16, "gan.num_layers": 1000,
           "train.seed": 2**32 - 1, "dist.timeout_s": 2**31 - 1}
FLOAT_MAX = {"data.dali_hw_decoder_load": 1.0, "data.labelsets_evidence": 1.0, "data.labelsets_hidden_fraction": 1.0,
             "data.labelsets_hidden_evidence": 1.0, "gan.negative_slope": 1.0, "optim.bce_lr": 1e10, "optim.g_lr": 1e10,
             "optim.d_lr": 1e10, "optim.beta1": 1.0, "optim.beta2": 1.0, "dist.bucket_cap_mb": 2.0**20}


def _not_a_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return text.lower() not in BOOL_WORDS
    return False


WORD = st.text(string.ascii_letters + "_", min_size=1, max_size=10)
TEXT = WORD.filter(_not_a_number)
FRACTION = st.floats(0.01, 1e6).filter(lambda x: x != int(x)).map(repr)
NEGATIVE_INT = st.integers(-(10**18), -1).map(str)
NAN = st.sampled_from(["nan", "NaN", "-nan", "NAN"])
INFINITE = st.sampled_from(["inf", "-inf", "Infinity", "1e999", "-1e400"])
NEGATIVE_FLOAT = st.floats(-1e30, -1e-9).map(repr)
# (A string is parsed as the command line parses it: "7" is a valid int in a --config file.)
JSON_NOT_INT = st.sampled_from([7.5, True, None, [1], {"a": 1}, "seven"])
JSON_NOT_FLOAT = st.sampled_from([True, None, [0.1], {}, "tenth"])
JSON_NOT_BOOL = st.sampled_from([1, 0, None, [], 0.5, {}])
JSON_NOT_STR = st.sampled_from([5, None, [], True, {"x": 1}])


def _fields() -> list[tuple[str, type]]:
    out = []
    for section in fconfig.SECTIONS:
        cls = fconfig.SECTION_TYPES[section]
        hints = typing.get_type_hints(cls)
        out += [(f"{section}.{f.name}", hints[f.name]) for f in dataclasses.fields(cls)]
    return out


def _cli(command: str, base: list[str], key: str, values, **kw) -> st.SearchStrategy:
    return values.map(lambda v: Case(command, [*base, f"--{key}", v], **kw))


def _json(command: str, base: list[str], key: str, values) -> st.SearchStrategy:
    section, _, name = key.partition(".")
    doc = (lambda v: {section: {name: v}}) if name else (lambda v: {key: v})
    return values.map(lambda v: Case(command, [*base, "--config", "{case}/c.json"], files={"c.json": json.dumps(doc(v))}))


def option_kinds() -> list[Kind]:
    """Every option of every config section, each with the values it must refuse."""
    kinds = []
    for key, typ in _fields():
        values: dict[str, st.SearchStrategy] = {}
        if typ is int:
            values = {"text": TEXT, "a fraction": FRACTION, "negative": NEGATIVE_INT}
            if key in INT_MAX:
                values["above its maximum"] = st.integers(INT_MAX[key] + 1, INT_MAX[key] * 1000 + 10**6).map(str)
            json_bad = JSON_NOT_INT
        elif typ is float:
            values = {"text": TEXT, "NaN": NAN, "infinite": INFINITE, "negative": NEGATIVE_FLOAT}
            if key in FLOAT_MAX:
                hi = FLOAT_MAX[key]
                values["above its maximum"] = st.floats(math.nextafter(hi, math.inf) * (1 + 1e-9), hi * 1e6 + 2).map(repr)
            json_bad = JSON_NOT_FLOAT
        elif typ is bool:
            values = {"text": TEXT}
            json_bad = JSON_NOT_BOOL
        else:
            if key in CHOICES:
                values = {"text": WORD.filter(lambda w, c=CHOICES[key]: w not in c)}
            values["a NUL character"] = WORD.map(lambda w: f"{w}\x00x")
            json_bad = JSON_NOT_STR
        for what, strategy in values.items():
            kinds.append(Kind("train", f"--{key} {what}", _cli("train", TRAIN, key, strategy), examples=2))
        kinds.append(Kind("train", f"--config {key}: wrong JSON type", _json("train", TRAIN, key, json_bad), examples=2))
        section = key.partition(".")[0]
        if section == "data" and (typ in (int, float) or key in CHOICES):  # the same options through check and cache
            kinds.append(Kind("check", f"--{key} text", _cli("check", CHECK, key, TEXT)))
            if typ is int:
                kinds.append(Kind("evaluate", f"--{key} text", _cli("evaluate", ["--checkpoint", "{ws}/run"], key, TEXT)))
            if key in ("data.image_size", "data.num_threads", "data.on_bad_image", "data.dataset", "data.batch_size"):
                base = ["build", *CHECK, "--data.cache_dir", "{case}/c"]
                kinds.append(Kind("cache", f"build --{key} text", _cli("cache", base, key, TEXT)))
        if section in ("gan", "optim", "train") and typ in (int, float):
            base = ["--preset", "smoke", "--out", "{case}/rep", "--seeds", "1"]
            kinds.append(Kind("reproduce", f"--{key} negative", _cli("reproduce", base, key,
                                                                      NEGATIVE_INT if typ is int else NEGATIVE_FLOAT)))
    top = {"--preset unknown": _cli("train", TRAIN, "preset", WORD.filter(lambda w: w not in PRESETS)),
           "--overwrite text": _cli("train", TRAIN, "overwrite", TEXT),
           "--out with a NUL": _cli("train", TRAIN, "out", WORD.map(lambda w: f"{{case}}/{w}\x00")),
           "--config out: wrong JSON type": _json("train", TRAIN, "out", JSON_NOT_STR),
           "--config preset: wrong JSON type": _json("train", TRAIN, "preset", JSON_NOT_STR)}
    kinds += [Kind("train", name, s, examples=2) for name, s in top.items()]
    return kinds


def _fixed(command: str, name: str, argv: list[str], **kw) -> Kind:
    return Kind(command, name, st.just(Case(command, argv, **kw)))


DEEP = "[" * 100_000 + "]" * 100_000
BYTES = st.binary(min_size=1, max_size=200).filter(lambda b: not b.strip().startswith((b"{", b"[")))


def bad_file_strategies(name: str) -> dict[str, st.SearchStrategy]:
    """``{name}`` as every kind of wrong file: (kind, strategy of files dict)."""
    return {
        "missing": st.just({}),
        "a folder": st.just({name: DIR}),
        "a FIFO": st.just({name: FIFO}),
        "/dev/zero": st.just({name: Special("link", "/dev/zero")}),
        "empty": st.just({name: b""}),
        "binary garbage": BYTES.map(lambda b: {name: b}),
        "a symlink loop": st.just({name: Special("link", "{case}/" + name + ".loop"),
                                   name + ".loop": Special("link", "{case}/" + name)}),
    }


def file_kinds() -> list[Kind]:
    kinds: list[Kind] = []

    def files(command, label, name, argv, extra_files=None, expect="error", codes=(2,), which=None):
        for what, strategy in bad_file_strategies(name).items():
            if which and what not in which:
                continue
            def make(f, argv=argv, extra=extra_files):
                return Case(command, argv, files={**(extra or {}), **f}, expect=expect, codes=codes)

            kinds.append(Kind(command, f"{label} {what}", strategy.map(make)))

    # train: the config and every data file, one kind of damage each
    files("train", "--config", "c.json", [*TRAIN, "--config", "{case}/c.json"])
    coco = ["--data.dataset", "coco", "--data.train_annotations", "{case}/train.json", "--data.train_images",
            "{ws}/data/train2017", "--data.val_annotations", "{ws}/data/annotations/instances_val.json",
            "--data.val_images", "{ws}/data/val2017"]
    files("train", "coco annotations", "train.json", [*TRAIN, *coco])
    files("check", "coco annotations", "train.json", ["--data.dataset", "coco", "--data.train_annotations",
                                                      "{case}/train.json", "--data.train_images", "{ws}/data/train2017"])
    lst = ["--data.dataset", "list", "--data.list_train", "{case}/train.csv", "--data.list_val", "{case}/val.csv",
           "--data.label_names", "{case}/names.txt", "--data.image_root", "{ws}/data/train2017"]
    good_list = {"train.csv": "000000000001.jpg,x\n", "val.csv": "000000000002.jpg,x\n", "names.txt": "x\n"}
    for name in ("train.csv", "names.txt"):
        for command in ("train", "check"):
            base = [*TRAIN, *lst] if command == "train" else lst
            # check reports an empty or unparsable-but-UTF-8 list (exit 1); the other damage is one line
            codes = (1, 2) if command == "check" and name == "train.csv" else (2,)
            files(command, f"list {name}", name, base, {k: v for k, v in good_list.items() if k != name},
                  expect="handled" if codes != (2,) else "error", codes=codes)
    feats = ["--data.dataset", "features", "--model.backbone", "mlp", "--data.features_train", "{case}/train.npz",
             "--data.features_test", "{case}/train.npz"]
    files("train", "features file", "train.npz", [*TRAIN, *feats])
    labelsets = ["--data.dataset", "labelsets", "--model.backbone", "mlp", "--data.labelsets_train", "{case}/l.txt",
                 "--data.labelsets_test", "{case}/l.txt"]
    files("train", "labelsets file", "l.txt", [*TRAIN, *labelsets])
    files("train", "nuswide Concepts81.txt", "nus/Concepts81.txt",
          [*TRAIN, "--data.dataset", "nuswide", "--data.nuswide_root", "{case}/nus"], which=("a FIFO", "/dev/zero", "a folder"))
    files("train", "--data.root", "emb", [*TRAIN, "--data.root", "{case}/emb"], which=("a FIFO", "/dev/zero", "binary garbage"))
    files("train", "--data.cache_dir", "c", [*TRAIN, "--data.backend", "cache", "--data.cache_dir", "{case}/c"],
          which=("a FIFO", "/dev/zero", "binary garbage", "empty"))
    files("train", "--resume", "r", [*TRAIN[:2], "--resume", "{case}/r"])
    files("train", "--model.pretrained file", "w.pth", [*TRAIN, "--model.backbone", "resnet18", "--model.pretrained",
                                                        "{case}/w.pth"], which=("a FIFO", "binary garbage", "empty", "/dev/zero"))
    files("train", "--gan.feature_cache file", "f.cache", [*TRAIN, "--gan.feature_cache", "{case}/f.cache",
                                                           "--train.bce_epochs", "0"], which=("a FIFO", "binary garbage"))
    # evaluate, export, predict: the model argument
    files("evaluate", "--checkpoint", "m.pt", ["--checkpoint", "{case}/m.pt"])
    files("export", "--checkpoint", "m.pt", ["--checkpoint", "{case}/m.pt", "--out", "{case}/out"])
    files("predict", "MODEL", "m.pt", ["{case}/m.pt", "{ws}/images/a.jpg"])
    # a UTF-8 garbage list is a list of missing images: their rows say so (exit 1)
    files("predict", "--list", "l.txt", ["{ws}/model", "--list", "{case}/l.txt"], expect="handled", codes=(1, 2))
    files("predict", "MODEL sidecar", "m/fastmlgan.json", ["{case}/m", "{ws}/images/a.jpg"],
          {"m/model.safetensors": b"x"}, which=("a FIFO", "/dev/zero", "binary garbage", "a symlink loop", "empty"))
    # predict: images it cannot read get their error row (exit 1), never a hang or a traceback
    files("predict", "image", "x.jpg", ["{ws}/model", "{ws}/images/a.jpg", "{case}/x.jpg"], expect="handled", codes=(1,),
          which=("missing", "a FIFO", "/dev/zero", "empty", "binary garbage", "a symlink loop"))
    files("predict", "image", "x.jpg", ["{ws}/model", "{ws}/images/a.jpg", "{case}/x.jpg"], expect="handled", codes=(0,),
          which=("a folder",))  # a folder is searched for images: none here, a warning names it
    files("check", "--json", "r.json", [*CHECK, "--json", "{case}/r.json"], which=("a FIFO", "a folder", "/dev/zero"))
    # cache
    files("cache", "verify", "x.fmlc", ["verify", "{case}/x.fmlc"])
    files("cache", "info", "x.fmlc", ["info", "{case}/x.fmlc"], expect="handled", codes=(0,),
          which=("missing", "a FIFO", "binary garbage", "empty", "/dev/zero", "a folder"))
    # metrics
    files("metrics", "SCORES", "s.npy", ["{case}/s.npy", "{ws}/npy/targets.npy"])
    files("metrics", "TARGETS", "t.npy", ["{ws}/npy/scores.npy", "{case}/t.npy"])
    files("metrics", "--class-names", "n.txt", ["{ws}/npy/scores.npy", "{ws}/npy/targets.npy", "--per-class",
                                                "--class-names", "{case}/n.txt"], which=("missing", "a FIFO", "a folder", "/dev/zero"))
    # reproduce: the results folder's own files
    for name in ("harness.json",):
        files("reproduce", name, f"rep/{name}", ["--preset", "smoke", "--out", "{case}/rep", "--seeds", "1",
                                                  "--data.root", "{ws}/data"], {"rep/.keep": b""},
              which=("a FIFO", "/dev/zero", "binary garbage", "empty", "a folder"))
    files("reproduce", "--out", "rep", ["--preset", "smoke", "--out", "{case}/rep", "--seeds", "1", "--data.root", "{ws}/data"],
          which=("a FIFO", "binary garbage", "/dev/zero"))
    files("embedded", "--out", "e", ["--out", "{case}/e"], which=("a FIFO", "binary garbage", "/dev/zero"))
    return kinds


JPEG = "{ws}/images/a.jpg"


def command_kinds() -> list[Kind]:
    """Each command's own options and the special inputs the issue found."""
    k: list[Kind] = []
    t = lambda name, argv, **kw: k.append(_fixed("train", name, argv, **kw))  # noqa: E731
    t("--nproc 0", ["--nproc", "0", *TRAIN])
    t("--nproc text", ["--nproc", "two", *TRAIN])
    t("--nproc without a value", [*TRAIN, "--nproc"])
    t("a positional argument", [*TRAIN, "extra"])
    t("an option without a value", [*TRAIN, "--data.batch_size"])
    k.append(Kind("train", "an unknown option", WORD.map(lambda w: Case("train", [*TRAIN, f"--data.{w}z", "1"]))))
    t("--resume with --overwrite", [*TRAIN, "--resume", "{ws}/run", "--overwrite"])
    t("--resume with --config", [*TRAIN[:2], "--resume", "{ws}/run", "--config", "{ws}/run/config.json"])
    t("--resume that changes the width", [*TRAIN[:2], "--resume", "{case}/r", "--model.width", "16"],
      files={"r": Special("link", "{ws}/run")})
    t("--resume with only a dangling step link", [*TRAIN[:2], "--resume", "{case}/r"],
      files={"r/checkpoints/step-000000009.pt": Special("link", "{case}/gone.pt")})
    t("--out is a file", [*TRAIN, "--out", "{case}/f"], files={"f": b"x"})
    t("--out is a FIFO", [*TRAIN, "--out", "{case}/f"], files={"f": FIFO})
    t("--out under a file", [*TRAIN, "--out", "{case}/f/run"], files={"f": b"x"})
    t("--out in use by another run", [*TRAIN, "--out", "{case}/busy"], lock="busy")
    t("--out a foreign folder with --overwrite", [*TRAIN, "--out", "{case}/o", "--overwrite"], files={"o/notes.txt": b"x"})
    t("--out the trained run without --resume", [*TRAIN, "--out", "{ws}/run"])
    t("image_size below the backbone's minimum", [*TRAIN, "--model.backbone", "vgg16", "--data.image_size", "16"])
    t("a phase-2 batch larger than the data", [*TRAIN, "--data.batch_size", "64"])
    t("a D too large to build", [*TRAIN, "--gan.hidden_dim", "60000", "--gan.num_layers", "900"])
    t("a smallcnn too large to build", [*TRAIN, "--model.width", "60000"])
    t("conditional false with negative sampling", [*TRAIN, "--gan.conditional", "false"])
    t("compile with the autograd penalty", [*TRAIN, "--compile.enable", "--gan.penalty", "autograd"])
    t("features data with a CNN", [*TRAIN, "--data.dataset", "features"])
    t("coco without its files", [*TRAIN, "--data.dataset", "coco"])
    coco_ann = lambda images: json.dumps({"images": images, "categories": [{"id": 1, "name": "x"}],  # noqa: E731
                                          "annotations": [{"image_id": i["id"], "category_id": 1} for i in images]})
    base = ["--data.dataset", "coco", "--data.train_annotations", "{case}/a.json", "--data.train_images",
            "{ws}/data/train2017", "--data.val_annotations", "{case}/a.json", "--data.val_images", "{ws}/data/train2017"]
    for label, file_name in (("../ climbing out", "../../../../etc/hostname"), ("absolute", "/etc/hostname"),
                             ("/dev/zero", "/dev/zero"), ("a NUL", "a\u0000.jpg")):
        doc = coco_ann([{"id": 1, "file_name": "000000000001.jpg"}, {"id": 2, "file_name": file_name}])
        k.append(_fixed("train", f"coco file_name {label}", [*TRAIN, *base], files={"a.json": doc}))
        expect = {"expect": "handled", "codes": (1,)} if "NUL" not in label else {}  # a NUL: the file is malformed
        k.append(_fixed("check", f"coco file_name {label}", base[:6], files={"a.json": doc}, **expect))
    k.append(_fixed("train", "coco nested 100,000 deep", [*TRAIN, *base], files={"a.json": DEEP}))
    k.append(_fixed("train", "coco every image missing", [*TRAIN, *base],
                    files={"a.json": coco_ann([{"id": 1, "file_name": "absent.jpg"}])}))
    k.append(_fixed("check", "coco every image missing", base[:6], files={"a.json": coco_ann([{"id": 1, "file_name": "absent.jpg"}])},
                    expect="handled", codes=(1,)))
    k.append(_fixed("check", "coco every image unlabelled", base[:6], expect="handled", codes=(1,),
                    files={"a.json": json.dumps({"images": [{"id": 1, "file_name": "000000000001.jpg"}],
                                                 "categories": [{"id": 1, "name": "x"}], "annotations": []})}))
    loop_images = {"img": Special("link", "{case}/img2"), "img2": Special("link", "{case}/img"),
                   "a.json": coco_ann([{"id": 1, "file_name": "000000000001.jpg"}])}
    loop = ["--data.dataset", "coco", "--data.train_annotations", "{case}/a.json", "--data.train_images", "{case}/img"]
    k.append(_fixed("check", "coco image folder a symlink loop", loop, files=loop_images, expect="handled", codes=(1,)))
    k.append(_fixed("train", "coco image folder a symlink loop", [*TRAIN, *loop, "--data.val_annotations", "{case}/a.json",
                                                                 "--data.val_images", "{case}/img"], files=loop_images))
    stray = "\n".join(f"{i:012d}.jpg,x" for i in range(1, 17)).replace("000000000003", '"000000000003', 1) + "\n"
    lst = ["--data.dataset", "list", "--data.list_train", "{case}/t.csv", "--data.list_val", "{case}/t.csv",
           "--data.label_names", "{case}/n.txt", "--data.image_root", "{ws}/data/train2017"]
    k.append(_fixed("train", "list file with a stray quote", [*TRAIN, *lst], files={"t.csv": stray, "n.txt": "x\n"}))
    k.append(_fixed("check", "list file with a stray quote", lst, files={"t.csv": stray, "n.txt": "x\n"}, expect="handled", codes=(1,)))
    for label, path in (("../", "../../../../etc/hostname"), ("absolute", "/etc/hostname")):
        k.append(_fixed("train", f"list path {label}", [*TRAIN, *lst], files={"t.csv": f"{path},x\n", "n.txt": "x\n"}))

    # evaluate
    e = lambda name, argv, **kw: k.append(_fixed("evaluate", name, argv, **kw))  # noqa: E731
    e("no --checkpoint", [])
    e("--threshold NaN", ["--checkpoint", "{ws}/run", "--threshold", "nan"])
    e("--threshold 2", ["--checkpoint", "{ws}/run", "--threshold", "2"])
    e("--threshold text", ["--checkpoint", "{ws}/run", "--threshold", "x"])
    e("an unknown option", ["--checkpoint", "{ws}/run", "--bogus"])
    e("a data option without a value", ["--checkpoint", "{ws}/run", "--data.batch_size"])
    e("a folder without checkpoints", ["--checkpoint", "{case}"])
    e("a corrupt last.pt", ["--checkpoint", "{case}/r"], files={"r/checkpoints/last.pt": b"PK\x05\x06" + b"\x00" * 18})
    e("data of other classes", ["--checkpoint", "{ws}/run", "--data.dataset", "list", "--data.list_val", "{case}/t.csv",
                                "--data.list_train", "{case}/t.csv", "--data.label_names", "{case}/n.txt",
                                "--data.image_root", "{ws}/data/train2017"], files={"t.csv": "000000000001.jpg,x\n", "n.txt": "x\n"})
    e("standard output full", ["--checkpoint", "{ws}/run"], stdout="full")

    # predict
    p = lambda name, argv, **kw: k.append(_fixed("predict", name, argv, **kw))  # noqa: E731
    for option, values in (("--threshold", ["nan", "inf", "-0.1", "1.5", "x"]), ("--top-k", ["0", "-1", "17", "x"]),
                           ("--batch-size", ["0", "-1", "x"]), ("--num-workers", ["-1", "x"]),
                           ("--format", ["xml"]), ("--device", ["tpu"])):
        for v in values:
            p(f"{option} {v}", ["{ws}/model", JPEG, option, v])
    p("--threshold with --top-k", ["{ws}/model", JPEG, "--threshold", "0.5", "--top-k", "2"])
    p("no images", ["{ws}/model"])
    p("a folder without images", ["{ws}/model", "{case}/empty"], files={"empty/notes.txt": b"x"})
    p("--out an input image", ["{ws}/model", JPEG, "--out", JPEG])
    p("--out the run's last.pt", ["{ws}/model", JPEG, "--out", "{ws}/run/checkpoints/last.pt"])
    p("--out the run's metrics.json", ["{ws}/model", JPEG, "--out", "{ws}/run/metrics.json"])
    p("--out the model's weights", ["{ws}/model", JPEG, "--out", "{ws}/model/model.safetensors"])
    p("--out a folder", ["{ws}/model", JPEG, "--out", "{case}"])
    p("--out a FIFO", ["{ws}/model", JPEG, "--out", "{case}/o"], files={"o": FIFO})
    p("--out in a missing folder", ["{ws}/model", JPEG, "--out", "{case}/no/o.csv"])
    p("--out with a NUL", ["{ws}/model", JPEG, "--out", "{case}/o\x00.csv"])
    p("standard output full", ["{ws}/model", JPEG], stdout="full")
    p("a run folder without checkpoints", ["{case}/r", JPEG], files={"r/config.json": "{}"})
    for label, name, expect in (("a 16-bit PNG", "g16.png", (0,)), ("a float TIFF", "f.tif", (0,)),
                                ("an EXIF-rotated PNG", "exif.png", (0,)), ("a float TIFF beyond 1", "hdr.tif", (1,)),
                                ("a 32-bit integer TIFF", "i32.tif", (1,)), ("a truncated JPEG", "cut.jpg", (1,))):
        p(f"image: {label}", ["{ws}/model", f"{{ws}}/images/{name}"], expect="handled", codes=expect)
    p("image path with a NUL", ["{ws}/model", JPEG, "a\x00.jpg"])
    p("image: /dev/zero named directly", ["{ws}/model", JPEG, "/dev/zero"], expect="handled", codes=(1,))
    k += sidecar_kinds()

    # export
    x = lambda name, argv, **kw: k.append(_fixed("export", name, argv, **kw))  # noqa: E731
    x("no --out", ["--checkpoint", "{ws}/run"])
    x("no --checkpoint", ["--out", "{case}/o"])
    x("--checkpoint an export", ["--checkpoint", "{ws}/model", "--out", "{case}/o"])
    x("--out a file", ["--checkpoint", "{ws}/run", "--out", "{case}/f"], files={"f": b"x"})
    x("--out a FIFO", ["--checkpoint", "{ws}/run", "--out", "{case}/f"], files={"f": FIFO})
    x("--out the run folder", ["--checkpoint", "{ws}/run", "--out", "{ws}/run", "--overwrite"])
    x("--out the checkpoints folder", ["--checkpoint", "{ws}/run", "--out", "{ws}/run/checkpoints", "--overwrite"])
    x("--out the export without --overwrite", ["--checkpoint", "{ws}/run", "--out", "{ws}/model"])
    x("--out with a user's model.onnx", ["--checkpoint", "{ws}/run", "--out", "{case}/o", "--overwrite"],
      files={"o/model.onnx": b"mine"})
    x("--out an export beside a user's model.pt2", ["--checkpoint", "{ws}/run", "--out", "{case}/o", "--overwrite",
                                                    "--torch-export"],
      files={"o/fastmlgan.json": Special("link", "{ws}/model/fastmlgan.json"), "o/model.pt2": b"mine"})
    x("--out with a NUL", ["--checkpoint", "{ws}/run", "--out", "{case}/o\x00"])
    x("an unknown option", ["--checkpoint", "{ws}/run", "--out", "{case}/o", "--bogus"])

    # check
    c = lambda name, argv, **kw: k.append(_fixed("check", name, argv, **kw))  # noqa: E731
    for option, values in (("--first", ["-1", "x"]), ("--threads", ["0", "-1", "100000", "x"])):
        for v in values:
            c(f"{option} {v}", [*CHECK, option, v])
    c("--first without a value", [*CHECK, "--first"])
    c("--json in a missing folder", [*CHECK, "--json", "{case}/no/r.json"])
    c("--json with a NUL", [*CHECK, "--json", "{case}/r\x00.json"])
    c("no dataset", [], expect="handled", codes=(2,))
    c("coco without images", ["--data.dataset", "coco", "--data.train_annotations", "{ws}/data/annotations/instances_train.json"])
    c("list without names", ["--data.dataset", "list", "--data.list_train", "{case}/t.csv"], files={"t.csv": "a.jpg,x\n"})
    c("features data", ["--data.dataset", "features", "--model.backbone", "mlp"])
    c("nuswide without its root", ["--data.dataset", "nuswide"])
    c("an unknown option", [*CHECK, "--data.bogus", "1"])
    c("standard output full", CHECK, stdout="full")

    # cache
    q = lambda name, argv, **kw: k.append(_fixed("cache", name, argv, **kw))  # noqa: E731
    q("no command", [])
    q("an unknown command", ["rebuild"])
    q("build --split unknown", ["build", *CHECK, "--split", "test", "--data.cache_dir", "{case}/c"])
    q("build --decoder unknown", ["build", *CHECK, "--decoder", "gpu", "--data.cache_dir", "{case}/c"])
    q("build features data", ["build", "--data.dataset", "features", "--model.backbone", "mlp", "--data.cache_dir", "{case}/c"])
    q("build into a file", ["build", *CHECK, "--data.cache_dir", "{case}/c"], files={"c": b"x"})
    for label, edit in (("a pixel edited", "pixel"), ("truncated", "truncate"), ("header edited", "header")):
        q(f"verify: {label}", ["verify", f"{{ws}}/cache-{edit}.fmlc"])
        k.append(_fixed("train", f"cache {label}", [*TRAIN, "--data.backend", "cache", "--data.cache_dir", f"{{ws}}/cache-{edit}"]))

    # reproduce
    r = lambda name, argv, **kw: k.append(_fixed("reproduce", name, argv, **kw))  # noqa: E731
    rb = ["--preset", "smoke", "--out", "{case}/rep", "--data.root", "{ws}/data"]
    for option, values in (("--seeds", ["0", "-3", "1000000000000", "x", "1,1", "1,-2", "99999999999,1"]),
                           ("--threads", ["-1", "x", "100000"]), ("--val-fraction", ["0", "1", "nan", "x"]),
                           ("--variants", ["bogus"])):
        for v in values:
            r(f"{option} {v}", [*rb, option, v])
    r("--resume", [*rb, "--resume", "{ws}/run"])
    r("--seeds without a value", [*rb, "--seeds"])
    r("GAN variants without GAN epochs", [*rb, "--train.gan_epochs", "0"])
    r("harness.json nested 100,000 deep", [*rb, "--seeds", "1"], files={"rep/harness.json": DEEP})
    r("harness.json of another configuration", [*rb, "--seeds", "1"], files={"rep/harness.json": '{"config": {}}'})
    r("harness.json a list", [*rb, "--seeds", "1"], files={"rep/harness.json": "[1]"})

    # metrics
    m = lambda name, argv, **kw: k.append(_fixed("metrics", name, argv, **kw))  # noqa: E731
    good = ["{ws}/npy/scores.npy", "{ws}/npy/targets.npy"]
    for label, name in (("an object array", "object.npy"), ("an .npz archive", "arrays.npz"), ("1-D scores", "flat.npy"),
                        ("NaN scores", "nan.npy"), ("scores beyond [0, 1]", "big.npy"), ("other shape", "other.npy"),
                        ("an empty array", "empty.npy"), ("strings", "str.npy")):
        m(f"scores {label}", [f"{{ws}}/npy/{name}", good[1]])
    m("targets not 0/1", [good[0], "{ws}/npy/big.npy"])
    m("targets with NaN", [good[0], "{ws}/npy/nan.npy"])
    m("logits with NaN", ["{ws}/npy/nan.npy", good[1], "--logits"])
    for v in ("nan", "x", "inf"):
        m(f"--threshold {v}", [*good, "--threshold", v])
    m("no targets", [good[0]])
    m("an unknown option", [*good, "--bogus"])
    m("--class-names of another count", [*good, "--per-class", "--class-names", "{case}/n.txt"], files={"n.txt": "a\n"})
    m("standard output full", good, stdout="full")

    # embedded
    b = lambda name, argv, **kw: k.append(_fixed("embedded", name, argv, **kw))  # noqa: E731
    for option, values in (("--num-train", ["0", "-1", "100000000", "x"]), ("--num-val", ["0", "x"]),
                           ("--image-size", ["8", "100000", "x"]), ("--seed", ["-1", "99999999999", "x"])):
        for v in values:
            b(f"{option} {v}", ["--out", "{case}/e", option, v])
    b("no --out", [])
    b("--out a foreign folder", ["--out", "{case}/e", "--num-train", "4", "--num-val", "4"], files={"e/notes.txt": b"x"})
    b("--out with a NUL", ["--out", "{case}/e\x00"])
    b("an unknown option", ["--out", "{case}/e", "--bogus"])
    return k


def sidecar_kinds() -> list[Kind]:
    """fastmlgan.json with a field missing or of the wrong type, or pointing outside its folder."""
    fields = ["class_names", "model", "model.backbone", "model.num_labels", "model.feature_dim", "model.width",
              "model.depth", "preprocessing", "preprocessing.input", "preprocessing.image_size", "files", "files.weights",
              "files.weights_sha256", "format", "format_version"]
    wrong = st.sampled_from([None, "x", 3.5, [], {"a": 1}, True, -7])
    kinds = []
    for key in fields:
        for what, values in (("missing", st.just("<drop>")), ("of the wrong type", wrong)):
            make = lambda v, key=key: Case("predict", ["{case}/m", JPEG], files=_sidecar_files(key, v))  # noqa: E731
            kinds.append(Kind("predict", f"sidecar {key} {what}", values.map(make)))
    for label, key, value in (("extra class names", "class_names", "<extra>"), ("weights outside the folder", "files.weights",
                              "../x.safetensors"), ("weights absolute", "files.weights", "/etc/hostname"),
                              ("a checksum of other weights", "files.weights_sha256", "0" * 64),
                              ("format_version 99", "format_version", 99), ("nested 100,000 deep", "", DEEP)):
        kinds.append(Kind("predict", f"sidecar {label}", st.just(Case("predict", ["{case}/m", JPEG],
                                                                     files=_sidecar_files(key, value)))))
    kinds.append(Kind("predict", "weights with a flipped bit", st.just(Case("predict", ["{case}/m", JPEG], files={
        "m/fastmlgan.json": Special("link", "{ws}/model/fastmlgan.json"), "m/model.safetensors": Special("link", "{ws}/flipped.safetensors")}))))
    kinds.append(Kind("predict", "weights truncated", st.just(Case("predict", ["{case}/m", JPEG], files={
        "m/fastmlgan.json": Special("link", "{ws}/model/fastmlgan.json"), "m/model.safetensors": b"\x08\x00"}))))
    return kinds


def _sidecar_files(key: str, value) -> dict:
    """The workspace export's sidecar (read when the case runs) with one field changed."""
    return {"m/fastmlgan.json": SidecarEdit(key, value), "m/model.safetensors": Special("link", "{ws}/model/model.safetensors")}


@dataclasses.dataclass(frozen=True)
class SidecarEdit:
    key: str
    value: object

    def render(self, sidecar: dict) -> str:
        if not self.key:
            return self.value
        if self.value == "<extra>":
            sidecar["class_names"].append("unicorn")
            return json.dumps(sidecar)
        *parents, last = self.key.split(".")
        holder = sidecar
        for part in parents:
            holder = holder[part]
        if self.value == "<drop>":
            holder.pop(last, None)
        else:
            holder[last] = self.value
        return json.dumps(sidecar)


def all_kinds() -> list[Kind]:
    return option_kinds() + file_kinds() + command_kinds()
