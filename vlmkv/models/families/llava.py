"""LLaVA (llava-hf): each `<image>` is expanded by the processor into a run of image tokens;
adjacent images are split by the fixed count of patches per image."""
from ..modality import ModalityAdapter, _cfg_get, register_family


@register_family("llava")
class LlavaAdapter(ModalityAdapter):
    def __init__(self, config, tokenizer=None):
        super().__init__(config, tokenizer)
        self.visual_ids = {int(_cfg_get(config, "image_token_id", "image_token_index"))}
        vc = config.vision_config
        n = (vc.image_size // vc.patch_size) ** 2
        if getattr(config, "vision_feature_select_strategy", "default") == "full":
            n += 1
        self.tokens_per_image = n

    def frame_length(self, row_ids, start, end):
        return self.tokens_per_image
