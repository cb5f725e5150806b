"""Feature spaces that see shape: where generated images are compared with real ones (REFERENCE sections 8-9).

Pooled latents and down-sampled pixels cannot tell a ring from a disc, so quality is measured in the features of an
image network. Every extractor here has one interface, `FeatureExtractor`:

    features(images)       uint8 images (N, 3, H, W) -> (N, D) float features
    classify(features)     those features -> (N, K) class probabilities, or None when the extractor knows no labels
    probabilities(images)  classify(features(images))
    classes                the K label names ([] without labels)
    attribute_probabilities(images)   {field: (N, K_field) probabilities} of each named label field the extractor
                           has a classifier for (an evaluator's `attributes`; {} otherwise): what conditional
                           generation is scored with ("shape=ring" asked, ring predicted?)
    vae_sha256             the VAE whose decoder the extractor was fitted to read (None: any images)

Kinds:
- `ImageEvaluator` (config `kind: classifier`): a small CNN trained by `jobs.fit_evaluator` on labelled real data
  *in the decoder's domain* (training latents decoded by the same VAE decoder the generator's images go through),
  because a network trained on raw images cannot read a VAE's blur (REFERENCE section 9: 14% recognised). Its
  penultimate layer is the feature space; its softmax gives "recognisable" and the class histogram.
- `ImageEvaluator` (config `kind: contrastive`): the same network trained without labels (SimCLR's NT-Xent on two
  augmentations of each decoded image), for unlabelled image sets; label metrics are then skipped.
- `InceptionFeatures`: the standard FID Inception v3 (2048-d pool features), loaded from a weights file the user
  supplies (the `pt_inception-2015-12-05-6726825d.pth` FID tools use, or a safetensors copy of it), so FID numbers
  are comparable with published ones. Nothing is ever downloaded.

    python -m jobs.fit_evaluator --latents build/demo/latents --output models/demo/evaluator
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import torch
from torch import nn
from torch.nn import functional as F

from ..common.config import EbdError
from ..common.memory import cache_sized_chunk
from ..io.weights import load_weights_folder, save_weights_folder

EVALUATOR_FORMAT = "ebd.evaluator/1"


class FeatureExtractor(Protocol):
    classes: list[str]
    vae_sha256: str | None

    def features(self, images: torch.Tensor) -> torch.Tensor: ...

    def classify(self, features: torch.Tensor) -> torch.Tensor | None: ...

    def probabilities(self, images: torch.Tensor) -> torch.Tensor | None: ...

    def attribute_probabilities(self, images: torch.Tensor) -> dict[str, tuple[list[str], torch.Tensor]]: ...


def to_network_input(images: torch.Tensor, resolution: int) -> torch.Tensor:
    """uint8 (N, 3, H, W) -> float in [-1, 1] at resolution x resolution (bilinear, antialiased when shrinking)."""
    x = images.float() / 127.5 - 1.0
    if x.shape[-1] != resolution or x.shape[-2] != resolution:
        x = F.interpolate(x, size=(resolution, resolution), mode="bilinear", antialias=True, align_corners=False)
    return x


def _batched(fn, images: torch.Tensor, batch: int = 256) -> torch.Tensor:
    with torch.inference_mode():
        return torch.cat([fn(images[a:a + batch]) for a in range(0, len(images), batch)])


# ------------------------------------------------------------------------------------ the ebd evaluator

class ImageEvaluator(nn.Module):
    """A small convolutional image network: stages of two 3x3 convolutions (the second strided), GroupNorm, SiLU,
    global average pooling, then a `feature_dim` embedding (the feature space) and a linear class head (or a
    projection head when trained without labels). Works at any input size; images are resized to `resolution`."""

    def __init__(self, config: dict):
        super().__init__()
        self.config = dict(config)
        widths = list(config["widths"])
        layers, c_in = [], 3
        for c in widths:
            layers += [nn.Conv2d(c_in, c, 3, padding=1), nn.GroupNorm(min(8, c), c), nn.SiLU(),
                       nn.Conv2d(c, c, 3, stride=2, padding=1), nn.GroupNorm(min(8, c), c), nn.SiLU()]
            c_in = c
        self.trunk = nn.Sequential(*layers)
        self.embed = nn.Sequential(nn.Linear(c_in, config["feature_dim"]), nn.SiLU())
        outputs = len(config["classes"]) if config["kind"] == "classifier" else config.get("projection_dim", 64)
        self.head = nn.Linear(config["feature_dim"], outputs)
        # One classifier of its own per named label field (e.g. background), beside the feature network: fitted
        # after it, so adding one never moves the feature space the report's distances are measured in.
        self.attributes = nn.ModuleDict({name: ImageEvaluator(sub)
                                         for name, sub in config.get("attributes", {}).items()})

    @property
    def classes(self) -> list[str]:
        return list(self.config["classes"]) if self.config["kind"] == "classifier" else []

    @property
    def vae_sha256(self) -> str | None:
        return (self.config.get("vae") or {}).get("weights_sha256")

    @property
    def confidence(self) -> float:
        """The softmax a sample needs to count as recognised."""
        return float(self.config.get("confidence", 0.9))

    @property
    def none_index(self) -> int | None:
        """The column of the "(none of these)" class (the last), or None for an evaluator without one."""
        return len(self.classes) - 1 if self.config.get("none_class") and self.classes else None

    def recognisable_share(self, probabilities: torch.Tensor) -> float:
        """The share of images assigned to one of the real classes (never the none class) with softmax >=
        confidence."""
        from .quality import recognisable_share

        real = probabilities if self.none_index is None else probabilities[:, :self.none_index]
        return recognisable_share(real, self.confidence) if len(real) else 0.0

    def none_share(self, probabilities: torch.Tensor) -> float:
        """The share of images whose most likely class is "(none of these)" (0 without that class)."""
        if self.none_index is None or not len(probabilities):
            return 0.0
        return (probabilities.argmax(1) == self.none_index).double().mean().item()

    def embedding(self, x: torch.Tensor) -> torch.Tensor:
        return self.embed(self.trunk(x).mean(dim=(2, 3)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Network input (from `to_network_input`) -> class logits, or projections for the contrastive loss."""
        return self.head(self.embedding(x))

    def features(self, images: torch.Tensor) -> torch.Tensor:
        self.eval()
        side = self.config["resolution"]
        batch = cache_sized_chunk(next(self.parameters()).device, 256, side * side)
        return _batched(lambda b: self.embedding(to_network_input(b, side)), images, batch)

    def classify(self, features: torch.Tensor) -> torch.Tensor | None:
        """Class probabilities from `features` (the head alone: a caller with features runs the trunk once)."""
        if self.config["kind"] != "classifier":
            return None
        self.eval()
        return _batched(lambda f: self.head(f).softmax(-1), features)

    def probabilities(self, images: torch.Tensor) -> torch.Tensor | None:
        return None if self.config["kind"] != "classifier" else self.classify(self.features(images))

    def attribute_probabilities(self, images: torch.Tensor) -> dict[str, tuple[list[str], torch.Tensor]]:
        """{field: (its values, (N, K) probabilities)} from each attribute classifier."""
        return {name: (sub.classes, sub.probabilities(images)) for name, sub in self.attributes.items()}

    def add_attribute(self, name: str, classifier: "ImageEvaluator") -> None:
        self.attributes[name] = classifier
        self.config["attributes"] = {k: v.config for k, v in self.attributes.items()}

    def save_pretrained(self, folder: str | Path) -> Path:
        """config.json + model.safetensors (`io.weights`): the weights first, the config last."""
        return save_weights_folder(folder, self.config | {"format": EVALUATOR_FORMAT}, self.state_dict())

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> "ImageEvaluator":
        config, tensors = load_weights_folder(folder, "an evaluator folder",
                                              "; make one with python -m jobs.fit_evaluator")
        if config.get("format") != EVALUATOR_FORMAT:
            raise EbdError(f"{Path(folder) / 'config.json'} has format {config.get('format')!r}, expected "
                           f"{EVALUATOR_FORMAT!r}")
        model = cls(config)
        model.load_state_dict(tensors)
        return model.eval()


# ------------------------------------------------------------------------ FID Inception (local weights)

class _BasicConv(nn.Module):
    def __init__(self, c_in, c_out, **kw):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, bias=False, **kw)
        self.bn = nn.BatchNorm2d(c_out, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


class _InceptionA(nn.Module):
    def __init__(self, c_in, pool_features):
        super().__init__()
        self.branch1x1 = _BasicConv(c_in, 64, kernel_size=1)
        self.branch5x5_1 = _BasicConv(c_in, 48, kernel_size=1)
        self.branch5x5_2 = _BasicConv(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = _BasicConv(c_in, 64, kernel_size=1)
        self.branch3x3dbl_2 = _BasicConv(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = _BasicConv(96, 96, kernel_size=3, padding=1)
        self.branch_pool = _BasicConv(c_in, pool_features, kernel_size=1)

    def forward(self, x):
        # FID's TensorFlow graph averages without counting the zero padding
        pool = F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)
        return torch.cat([self.branch1x1(x), self.branch5x5_2(self.branch5x5_1(x)),
                          self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          self.branch_pool(pool)], 1)


class _InceptionB(nn.Module):
    def __init__(self, c_in):
        super().__init__()
        self.branch3x3 = _BasicConv(c_in, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = _BasicConv(c_in, 64, kernel_size=1)
        self.branch3x3dbl_2 = _BasicConv(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = _BasicConv(96, 96, kernel_size=3, stride=2)

    def forward(self, x):
        return torch.cat([self.branch3x3(x), self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          F.max_pool2d(x, 3, stride=2)], 1)


class _InceptionC(nn.Module):
    def __init__(self, c_in, c7):
        super().__init__()
        self.branch1x1 = _BasicConv(c_in, 192, kernel_size=1)
        self.branch7x7_1 = _BasicConv(c_in, c7, kernel_size=1)
        self.branch7x7_2 = _BasicConv(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = _BasicConv(c7, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = _BasicConv(c_in, c7, kernel_size=1)
        self.branch7x7dbl_2 = _BasicConv(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = _BasicConv(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = _BasicConv(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = _BasicConv(c7, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = _BasicConv(c_in, 192, kernel_size=1)

    def forward(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d = x
        for layer in (self.branch7x7dbl_1, self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                      self.branch7x7dbl_5):
            d = layer(d)
        pool = F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)
        return torch.cat([self.branch1x1(x), b7, d, self.branch_pool(pool)], 1)


class _InceptionD(nn.Module):
    def __init__(self, c_in):
        super().__init__()
        self.branch3x3_1 = _BasicConv(c_in, 192, kernel_size=1)
        self.branch3x3_2 = _BasicConv(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = _BasicConv(c_in, 192, kernel_size=1)
        self.branch7x7x3_2 = _BasicConv(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = _BasicConv(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = _BasicConv(192, 192, kernel_size=3, stride=2)

    def forward(self, x):
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), b7, F.max_pool2d(x, 3, stride=2)], 1)


class _InceptionE(nn.Module):
    def __init__(self, c_in, pool: str):
        super().__init__()
        self.pool = pool  # FID's graph: average pooling in the first E block, max pooling in the last
        self.branch1x1 = _BasicConv(c_in, 320, kernel_size=1)
        self.branch3x3_1 = _BasicConv(c_in, 384, kernel_size=1)
        self.branch3x3_2a = _BasicConv(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = _BasicConv(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = _BasicConv(c_in, 448, kernel_size=1)
        self.branch3x3dbl_2 = _BasicConv(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = _BasicConv(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = _BasicConv(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = _BasicConv(c_in, 192, kernel_size=1)

    def forward(self, x):
        a = self.branch3x3_1(x)
        d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        if self.pool == "avg":
            pool = F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)
        else:
            pool = F.max_pool2d(x, 3, stride=1, padding=1)
        return torch.cat([self.branch1x1(x), self.branch3x3_2a(a), self.branch3x3_2b(a),
                          self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d), self.branch_pool(pool)], 1)


class FIDInceptionV3(nn.Module):
    """Inception v3 as the FID reference graph (TensorFlow, 2015-12-05) computes it, up to the 2048-d pool
    features. Parameter names follow torchvision's Inception3 and pytorch-fid, so their weight file loads as is."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = _BasicConv(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = _BasicConv(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = _BasicConv(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = _BasicConv(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = _BasicConv(80, 192, kernel_size=3)
        self.Mixed_5b, self.Mixed_5c, self.Mixed_5d = _InceptionA(192, 32), _InceptionA(256, 64), _InceptionA(288, 64)
        self.Mixed_6a = _InceptionB(288)
        self.Mixed_6b, self.Mixed_6c = _InceptionC(768, 128), _InceptionC(768, 160)
        self.Mixed_6d, self.Mixed_6e = _InceptionC(768, 160), _InceptionC(768, 192)
        self.Mixed_7a = _InceptionD(768)
        self.Mixed_7b, self.Mixed_7c = _InceptionE(1280, "avg"), _InceptionE(2048, "max")
        self.fc = nn.Linear(2048, 1008)  # in the weight file; unused for features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x in [-1, 1], (N, 3, 299, 299) -> (N, 2048)."""
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, 3, stride=2)
        x = F.max_pool2d(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)), 3, stride=2)
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c,
                      self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
            x = block(x)
        return x.mean(dim=(2, 3))


class InceptionFeatures:
    """FID's Inception features, from a local weights file (never downloaded). `.safetensors` files load as they
    are; a `.pth` file (the one FID tools ship) loads with torch's weights-only unpickler, which accepts tensors and
    nothing that runs code."""

    classes: list[str] = []
    vae_sha256 = None

    def __init__(self, weights: str | Path, device: str = "cpu"):
        path = Path(weights)
        if not path.is_file():
            raise EbdError(f"Inception weights not found at {path}: pass the local pt_inception-2015-12-05 file "
                           "(ebd never downloads weights)")
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            state = load_file(str(path))
        else:
            try:
                state = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as e:  # noqa: BLE001 - any unreadable file is one line for the user
                raise EbdError(f"{path} is not a readable Inception weights file: {type(e).__name__}") from None
        self.network = FIDInceptionV3()
        missing, unexpected = self.network.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.endswith("num_batches_tracked")]
        if missing or unexpected:
            raise EbdError(f"{path} does not hold FID Inception v3 weights ({len(missing)} missing, e.g. "
                           f"{(missing or unexpected)[0]}, {len(unexpected)} unexpected)")
        self.network = self.network.eval().requires_grad_(False).to(device)
        self.device = device

    def features(self, images: torch.Tensor) -> torch.Tensor:
        def run(batch):
            x = F.interpolate(batch.float(), size=(299, 299), mode="bilinear", align_corners=False)
            return self.network((x / 127.5 - 1.0).to(self.device)).cpu()
        return _batched(run, images, batch=64)

    def classify(self, features: torch.Tensor) -> None:
        return None

    def attribute_probabilities(self, images: torch.Tensor) -> dict:
        return {}

    def probabilities(self, images: torch.Tensor) -> None:
        return None


def load_feature_extractor(kind: str, evaluator: str | None = None, inception_weights: str | None = None):
    """The extractor a report asks for: `evaluator` (an ImageEvaluator folder) or `inception` (a weights file)."""
    if kind == "inception":
        if not inception_weights:
            raise EbdError("features: inception needs --inception-weights FILE (the local FID Inception weights)")
        return InceptionFeatures(inception_weights)
    if kind == "evaluator":
        if not evaluator:
            raise EbdError("features: evaluator needs --evaluator DIR (make one with python -m jobs.fit_evaluator)")
        return ImageEvaluator.from_pretrained(evaluator)
    raise EbdError(f"unknown feature space {kind!r}: use evaluator or inception")
