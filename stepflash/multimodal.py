"""Images in prompts (Step 3.7): decoding (Pillow), the crop plan and pixel tensors of the reference
image processor, and the placeholder token layout of the reference processor.
"""

IMAGE_TOKEN = "<im_patch>"  # one per feature row; the chat template writes one per image
PATCH_START, PATCH_END, PATCH_NEWLINE = "<patch_start>", "<patch_end>", "<patch_newline>"
VIEW_START, VIEW_END = "<im_start>", "<im_end>"  # around the global view (not the chat turn's <|im_start|>)
IMAGE_TOKENS = (IMAGE_TOKEN, PATCH_START, PATCH_END, PATCH_NEWLINE, VIEW_START, VIEW_END)
