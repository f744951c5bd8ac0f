"""Idefics3 / SmolVLM: an image is split into tiles, each a run of `image_seq_len` image tokens after
<fake_token_around_image> and a <row_i_col_j> marker, then a global view after <global-img>. With the
tokenizer, the markers are labelled special and tiles are grouped into images (a new image starts
with a tile run after text; the run after <global-img> closes it). Without it, every run is one frame
(SmolVLM video frames are single runs)."""
from ..modality import ModalityAdapter, _cfg_get, register_family


@register_family("idefics3", "smolvlm")
class Idefics3Adapter(ModalityAdapter):
    def __init__(self, config, tokenizer=None):
        super().__init__(config, tokenizer)
        self.visual_ids = {int(_cfg_get(config, "image_token_id"))}
        vc = config.vision_config
        self.image_seq_len = (vc.image_size // vc.patch_size) ** 2 // (config.scale_factor ** 2)
        self.fake = self._token_id("<fake_token_around_image>")
        self.global_img = self._token_id("<global-img>")
        specials = {self.fake, self.global_img}
        if tokenizer is not None:
            for tok in getattr(tokenizer, "additional_special_tokens", None) or []:
                if tok.startswith("<row_") and "_col_" in tok:
                    specials.add(self._token_id(tok))
        self.special_ids = {t for t in specials if t is not None}

    def frame_length(self, row_ids, start, end):
        # without the tokenizer's markers, every tile / frame run is its own frame
        return self.image_seq_len if self.fake is None else None

    def start_row(self):
        self._prev_global = True

    def new_image_before(self, row_ids, start):
        if self.fake is None:
            return True
        new = self._prev_global  # the previous run was an image's global view (or there was none)
        self._prev_global = start > 0 and row_ids[start - 1] == self.global_img
        return new
