"""Write the fixed vocabulary of the tiny presets' tokenizer: models/mgm/data/tiny_tokenizer.json.

Run once by a developer; its output is committed and loaded as data (models/mgm/tokenizer.py), because a BPE
trainer's output may change between library versions. Rerun only to change the vocabulary on purpose, then
update the hash in tests/models/mgm/test_presets.py.

    python scripts/build_tiny_tokenizer.py
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

OUTPUT = Path(__file__).resolve().parent.parent / "models" / "mgm" / "data" / "tiny_tokenizer.json"
VOCAB_SIZE = 1024

# Every chat template's control tokens are single tokens ([INST] stays plain text, as in Mistral's vocabulary).
SPECIAL_TOKENS = [
    "<unk>", "<s>", "</s>", "<pad>", "<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>",
    "<|im_start|>", "<|im_end|>", "<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
    "<|end_header_id|>", "<|eot_id|>",
]  # fmt: skip

# A small English corpus in the register the tiny models are used in: chat templates, image questions,
# story prompts, JSON answers and the <GEN> / <h>...</h> protocol.
CORPUS = """
A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, detailed, and polite answers to the user's questions. USER: What is in this image? ASSISTANT: The image shows a red car parked next to a tree.
[INST] Describe the picture in detail. [/INST] A small boat floats on a calm lake under a cloudy sky.
system
Answer the questions.
user
What colour is the cat?
assistant
The cat is black and white.
You are a helpful language and vision assistant. You are able to understand the visual content that the user provides, and assist the user with a variety of tasks using natural language.
Image 1: Image 2: Compare the two images and tell me what changed between them.
Write a short story about a fox who finds a lantern in the snowy forest.
Once upon a time, in a quiet village by the sea, there lived an old fisherman and his granddaughter.
Every morning they walked to the harbour, counted the boats, and watched the gulls circle above the waves.
Generate a picture of a cozy cabin in the mountains at sunset. <GEN>
Here is my idea for the picture. <h>a cozy wooden cabin in snowy mountains at sunset, warm light, detailed, 4k</h>
<h>a watercolor painting of a lighthouse on a cliff, soft colors, morning fog</h>
{"title": "The Lantern", "pages": [{"text": "The fox found a lantern.", "image": "a fox holding a glowing lantern"}], "score": 7}
{"answer": "yes", "confidence": 0.9, "objects": ["dog", "ball", "grass"], "count": 3}
Reference OCR Token: STOP, EXIT, OPEN 24 HOURS
Answer with the option's letter from the given choices directly. A. red B. blue C. green D. yellow
The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs.
Please critique the image: is the composition balanced, are the colors harmonious, and does it match the prompt?
The lighting is soft, the subject is centered, and the background is slightly blurred.
Rewrite the prompt to add more detail about the style, the lighting and the camera angle.
photo, portrait, landscape, illustration, cinematic, highly detailed, sharp focus, trending on artstation
out of frame, lowres, text, error, cropped, worst quality, low quality, jpeg artifacts, ugly, duplicate, watermark
Numbers: 0 1 2 3 4 5 6 7 8 9 10 12 16 24 32 64 100 256 512 1024 2048 2024 3.14 -1 +2 50% #1
Punctuation and code: ( ) [ ] { } < > = + - * / \\ | _ : ; , . ! ? ' " ` ~ @ # $ % ^ & \\n \\t
def main(): return {"ok": True, "items": [1, 2, 3], "name": "value"}
The children laughed as the kite rose higher and higher into the bright blue sky.
In the evening the city lights reflected on the river, and the streets grew quiet.
She opened the old book and a pressed flower fell from between the yellowed pages.
Is there a person in the photo? No, there are only two bicycles leaning against a wall.
How many apples are on the table? There are four apples on the table, two green and two red.
What is the man holding? He is holding an umbrella and a cup of coffee.
""".strip()


def build() -> Tokenizer:
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte encodes: no <unk> ever
        show_progress=False,
    )
    lines = CORPUS.splitlines()
    tokenizer.train_from_iterator(lines * 4, trainer=trainer)  # repeated so rarer pairs reach min_frequency
    return tokenizer


if __name__ == "__main__":
    OUTPUT.parent.mkdir(parents=True, exist_ok=True)
    build().save(str(OUTPUT), pretty=True)
    print(f"wrote {OUTPUT}")
