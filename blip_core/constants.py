"""Values of the BLIP recipe that several modules share, defined once.

Config defaults refer to these names; code that runs without a config (the tokenizer's cleaning functions,
the loaders' keyword defaults, ``blip caption``) uses them directly.
"""

# Per-channel RGB mean and standard deviation of CLIP's image normalisation, which BLIP uses.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# The captioner's prompt: prepended to captions in captioner fine-tuning, the start of every generated caption.
DEFAULT_PROMPT = "a picture of "

# Words kept by the text cleaning (``pre_caption``, ``pre_question``), as the official code.
CAPTION_MAX_WORDS = 30
QUESTION_MAX_WORDS = 50

# Tokens per text (special tokens and a prompt included), as the official training and evaluation configs.
PRETRAIN_TEXT_TOKENS = 30  # pre-training captions (model.max_text_len)
CAPTIONER_TEXT_TOKENS = 40  # captioner fine-tuning
RETRIEVAL_TEXT_TOKENS = 35  # filter (retrieval) fine-tuning and the retrieval evaluation
QUESTION_MAX_TOKENS = 35  # VQA questions
ANSWER_MAX_TOKENS = 30  # VQA answers in training
