"""The attribution driver: for one preview, the counterfactual renders that say which recipe difference explains
its gap (attribution.py decides, from distances; this module renders through the run's render cache, records
and saves), whether the fields the user accepted explain it, the kernel noise floor, and the prescription (the
smallest change to the server's request that fixes the preview)."""

from __future__ import annotations

import json

from PIL import Image

from .errors import NotRenderable
from .preview_file import open_preview, preview_encoder
from .recipe import FIELD_NAMES, Recipe, differing_fields, switch
from .verdicts import passes


class Explainer:
    """Attribution and accepted fields for the previews of a run (`options`: explain, accept, metric, floor,
    reverse, noise_floor), rendering through `renders` (renders.Renders) and saving into `images`."""

    def __init__(self, options, renders, images):
        self.options, self.renders, self.images = options, renders, images

    def render(self, recipe: Recipe, model: str) -> Image.Image:
        return self.renders.get(recipe, model)[0]

    def accepted(self, task) -> tuple[str, ...]:
        """The differing fields the user accepts (`--parity-accept`, the case's `accept:`), in field order."""
        findings = set(differing_fields(task.training, task.reference))
        return tuple(f for f in FIELD_NAMES if f in findings and f in set(self.options.accept) | set(task.accept))

    def explained_by(self, task, preview: Image.Image, fields: tuple[str, ...]) -> tuple[bool, str]:
        """The reference render with the accepted fields switched to their training values passes the thresholds,
        or comes down to the training render's own distance (plus the noise floor): the gap is explained by
        differences the user accepted, and what is left is within tolerance."""
        from .attribution import distance

        encode, metric = preview_encoder(task.preview), self.options.metric
        image = self.render(switch(task.reference, task.training, fields), task.model)
        switched = distance(preview, image, encode, metric)
        training = distance(preview, self.render(task.training, task.model), encode, metric)
        within = passes(preview, image, encode, task.thresholds)
        how = "passes the thresholds" if within else "does not pass the thresholds"
        detail = (f"{metric} {switched:.4g} with them at the training value ({how}) vs {training:.4g} for the "
                  f"training recipe")
        return within or switched <= training + self.options.floor, detail

    def noise_floor(self, task, preview: Image.Image, row: dict) -> float:
        """The same training recipe through PyTorch's math attention kernel instead of the fused one: how far
        kernel-level rounding alone moves this image (the floor verdicts and attribution are measured against)."""
        from .attribution import distance

        again, _ = self.renders.get(task.training, task.model, math_attention=True)
        encode = preview_encoder(task.preview)
        same = encode(self.render(task.training, task.model))  # in the comparison's encoding
        floor = {m: distance(same, again, encode, m) for m in ("mean_abs", "max_abs", "ssim", "psnr")}
        row.update({"floor_mean_abs": floor["mean_abs"], "floor_max_abs": floor["max_abs"],
                    "floor_how": "training recipe, math vs fused attention kernel (same device and dtype)"})
        return floor[self.options.metric]

    def explain(self, task, preview: Image.Image, row: dict, only: tuple[str, ...] | None = None):
        """Counterfactual renders: which finding explains the gap (attribution), saved and recorded; with `only`
        (the accepted fields of an explained preview), just the causes that hold one of them."""
        if task.training_problem:  # e.g. the ARA was not found: say which file, as the fidelity column does
            row["causes"] = json.dumps({"unavailable": f"the training recipe is not rendered here: "
                                                      f"{task.training_problem}"})
            return None
        try:
            result = self.attribute(task, preview, row, only)
        except NotRenderable as exc:  # attribution measures against the training render
            row["causes"] = json.dumps({"unavailable": f"the training recipe is not rendered here: {exc}"})
            return None
        row.update(result.as_columns())
        if self.options.reverse and result.closing is not None:  # a failed preview: the request that fixes it
            fix = self.prescribe(task, preview)
            row.update(fix=fix.describe(), fix_distance=fix.distance, fix_passes=fix.passes)
        for cause in result.causes:
            if cause.distance is not None:  # already rendered: served from the in-memory cache
                image = self.render(switch(task.reference, task.training, cause.fields), task.model)
                self.images.save(task, f"cause-{cause.name}", image)
        return result

    def attribute(self, task, preview: Image.Image, row: dict, only: tuple[str, ...] | None):
        """attribution.attribute on this preview's renders (NotRenderable: the training recipe is not)."""
        from .attribution import attribute, counterfactuals

        options, floor = self.options, self.options.floor
        prepare = lambda recipes: self.renders.prepare([(r, task.model) for r in recipes])  # noqa: E731
        prepare((task.reference, task.training, *counterfactuals(task.training, task.reference, only,
                                                                 options.reverse)))  # one load per pipeline
        if options.noise_floor:
            floor = max(floor, self.noise_floor(task, preview, row))
        encode = preview_encoder(task.preview)
        return attribute(lambda recipe: self.render(recipe, task.model), preview, task.training, task.reference,
                         metric=options.metric, floor=floor, reverse=options.reverse, encode=encode, only=only,
                         only_reason=f"the accepted fields ({', '.join(only or ())}) explain the gap; "
                                     f"--parity-explain all renders it",
                         passes=lambda image: passes(preview, image, encode, task.thresholds), prepare=prepare)

    def prescribe(self, task, preview: Image.Image | None = None):
        """The smallest change to the server's request for this preview that brings its render within the
        thresholds, verified by rendering (prescription.py)."""
        from .attribution import distance
        from .engines.server.requests import prepare
        from .prescription import prescribe

        preview = open_preview(task.preview) if preview is None else preview
        encode, metric = preview_encoder(task.preview), self.options.metric
        return prescribe(lambda recipe: self.render(recipe, task.model),
                         lambda image: distance(preview, image, encode, metric),
                         lambda image: passes(preview, image, encode, task.thresholds), prepare(task)[1])
