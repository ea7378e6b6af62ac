"""Classification by label diffusion (task.kind: classification, DiffMIC-v2): the task that diffuses label maps.

The frozen auxiliary classifier's global and local class probabilities make the guided prior map (B, K, Np, Np).
The diffused sample is the one-hot label map minus that prior, so the forward process on labels is CARD's and
DiffMIC's q(y_t | y_0, prior) = N(sqrt(a_t) y_0 + (1 - sqrt(a_t)) prior, (1 - a_t) I): the strategies' own
noising of the difference, with the prior added back. Sampling therefore starts from the prior plus noise and
ends at a label map whose mean over the Np x Np cells is the prediction.

Training runs in two stages over one step counter: the auxiliary classifier with cross-entropy for
`classifier.aux_steps` steps, then the denoiser with the focal-weighted noise loss while the auxiliary classifier
stays frozen (in eval mode, no gradient).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from diffusion.task import Field
from models.classifier import focal_weights, guided_prior_map
from utils.config import ClassifierConfig, ConfigError, TaskConfig

PRIOR = "prior"  # batch key of the guided prior map, computed once per batch


class LabelDiffusionTask:
    """Targets, conditions and loss reduction of a classification run (the interface of diffusion.task.Task).

    Args:
        image: the dataset's image field (C channels).
        class_names: in label order.
        image_size: the side of the square images.
    """

    kind = "classification"
    is_conditional = True  # every generated label map has the item's true label to compare with
    vector = None
    conditions: list = []
    region_mask = ""

    def __init__(self, cfg: TaskConfig, classifier: ClassifierConfig, image: Field, class_names: list[str],
                 image_size: int):
        if cfg.cond_drop_prob > 0:
            raise ConfigError("task.cond_drop_prob: a classification run always sees its image and prior; use 0")
        if cfg.perceptual_weight > 0:
            raise ConfigError("task.perceptual_weight compares images; a classification run diffuses label maps")
        self.cfg, self.classifier = cfg, classifier
        self.image, self.class_names = image, list(class_names)
        self.num_classes, self.image_size = len(class_names), image_size
        self.targets = [Field("label", "label_map", self.num_classes)]
        self.spatial_shape = (classifier.prior_size, classifier.prior_size)
        self.auxiliary = None  # the network's auxiliary classifier, set once the network is built

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        return (self.num_classes, *self.spatial_shape)  # (K, Np, Np)

    def trains_auxiliary(self, step: int) -> bool:
        """Whether optimizer step `step` (from 0) belongs to stage 1, the auxiliary classifier's training."""
        return step < self.classifier.aux_steps

    @torch.no_grad()
    def auxiliary_probabilities(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The frozen auxiliary classifier's global and local probabilities (B, K) each, in eval mode (its batch
        norm statistics stay as stage 1 left them)."""
        was_training = self.auxiliary.training
        self.auxiliary.eval()
        try:
            return self.auxiliary.priors(images)
        finally:
            self.auxiliary.train(was_training)

    def prior_of(self, batch: dict) -> torch.Tensor:
        """The batch's guided prior map (B, K, Np, Np), computed once and kept in the batch."""
        if PRIOR not in batch:
            batch[PRIOR] = guided_prior_map(*self.auxiliary_probabilities(batch["image"]), self.spatial_shape[0])
        return batch[PRIOR]

    def label_map(self, labels: torch.Tensor) -> torch.Tensor:
        """One-hot labels spread over the map: (B, K, Np, Np) of 0 and 1."""
        one_hot = F.one_hot(labels.long(), self.num_classes).float()  # (B, K)
        return one_hot[..., None, None].expand(-1, -1, *self.spatial_shape)

    def targets_of(self, batch: dict) -> torch.Tensor:
        return self.label_map(batch["label"]) - self.prior_of(batch)

    def condition_of(self, batch: dict, drop_prob: float = 0.0) -> dict:
        return {"image": batch["image"].float(), "prior": self.prior_of(batch)}

    def null_condition(self, cond: dict) -> dict:
        raise ConfigError("diffusion.guidance_scale: a classification run trains no null condition; use 1")

    def reduce(self, elementwise: torch.Tensor, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Per-sample loss (B,): the mean over the map weighted by 1 + alpha (1 - p)^gamma (`focal_weights`), p
        the prior's probability of the true class; diagnostics: the unweighted mean and the mean weight."""
        per_sample = elementwise.float().flatten(1).mean(dim=1)
        weights = focal_weights(self.prior_of(batch), batch["label"], self.classifier.focal_alpha,
                                self.classifier.focal_gamma)
        return per_sample * weights, {"loss_label_map": per_sample.mean(), "focal_weight": weights.mean()}

    def probabilities(self, x0: torch.Tensor, batch: dict) -> torch.Tensor:
        """Class probabilities (B, K) of sampled differences x0: the label map (x0 + prior) averaged over its cells,
        negative votes clipped and the rest normalised (uniform if nothing is left)."""
        votes = (x0.float() + self.prior_of(batch).float()).mean(dim=(-2, -1)).clamp_min(0)
        total = votes.sum(dim=1, keepdim=True)
        uniform = torch.full_like(votes, 1.0 / self.num_classes)
        return torch.where(total > 0, votes / total.clamp_min(1e-12), uniform)

    def describe(self, dataset) -> dict:
        """What a user of the exported classifier needs (final/task.yaml)."""
        return {
            "kind": self.kind,
            "classes": self.class_names,
            "image": {"name": self.image.name, "channels": self.image.channels, "size": self.image_size},
            "label_map": {"shape": list(self.sample_shape),
                          "encoding": "one-hot label map minus the guided prior map; prediction = mean over the "
                                      "map of (sample + prior), negatives clipped, normalised"},
            "prior": "guided_prior_map(auxiliary global and local softmax), classifier.prior_size cells a side",
            "normalization": dataset.normalization,
        }
