r"""Fine-tune a span-corruption-pretrained encoder-decoder onto translation (WEB -> Segond).

Commands (pretrain first, then fine-tune from its workdir):

    python -m lm.main --config experiments/t5_span_corruption.py --workdir workdirs/t5_span
    python -m lm.main --config experiments/t5_translation_finetune.py --workdir workdirs/t5_en_fr \
        --config.train.init_from=workdirs/t5_span

The model section equals t5_span_corruption's (init_from checks that the parameter shapes
match and names any key that differs); the fine-tune adopts the pretrained run's
SentencePiece tokenizer (its sentinels are simply unused here). Held-out books as in
bible_translation.py; the validation loss is measured before the first step too.
Arg: 'tiny' pairs with t5_span_corruption.py:tiny (used by the slow tests).
"""

import pathlib

from lm.config import config_of, experiment, experiment_args


def get_config(arg: str | None = None):
    args = experiment_args(arg, "tiny")
    pretrained = config_of(pathlib.Path(__file__).with_name("t5_span_corruption.py"), arg)
    config = experiment(
        preset="t5",
        model=dict(pretrained.model),
        data=dict(
            source="bible:4-l",
            task="translation",
            seq_len=64,
            encoder_len=96,
            batch_size=16,
            vocab_size=pretrained.data.vocab_size,
        ),
        optimizer=dict(name="adafactor", learning_rate=1e-3, warmup_steps=50, weight_decay=0.0),
        train=dict(
            init_from="workdirs/t5_span",
            steps=600,
            log_every=50,
            eval_every=200,
            eval_batches=16,
            eval_at_start=True,
            checkpoint_every=200,
            sample_tokens=48,
        ),
    )
    if "tiny" in args:
        config.data.update(seq_len=24, encoder_len=32, batch_size=8)
        config.train.update(
            steps=10,
            log_every=5,
            eval_every=10,
            eval_batches=4,
            checkpoint_every=10,
            sample_tokens=8,
        )
    return config
