"""LLaVA-OneVision: image tokens (any-resolution, variable count per image) and video tokens (a fixed,
pooled count per frame). Each image run is one image; a video run is cut into frames."""
import math

from ..modality import ModalityAdapter, _cfg_get, register_family


@register_family("llava_onevision", "llava_next_video", "llava_next")
class LlavaOnevisionAdapter(ModalityAdapter):
    def __init__(self, config, tokenizer=None):
        super().__init__(config, tokenizer)
        self.image_id = _cfg_get(config, "image_token_id", "image_token_index")
        self.video_id = _cfg_get(config, "video_token_id", "video_token_index")
        self.visual_ids = {int(t) for t in (self.image_id, self.video_id) if t is not None}
        vc = config.vision_config
        side = vc.image_size // vc.patch_size
        # OneVision pools video frames 2x2 (bilinear, ceil); frames then carry one newline token each
        pooled = math.ceil(side / 2) ** 2
        self.tokens_per_frame = pooled + (1 if config.model_type == "llava_onevision" else 0)

    def frame_length(self, row_ids, start, end):
        if self.video_id is not None and row_ids[start] == self.video_id:
            return self.tokens_per_frame
        return None
