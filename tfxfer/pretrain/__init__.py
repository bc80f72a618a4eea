"""Producing backbones: pretraining without labels, then transfer.

Many users have unlabelled data from their own domain and no pretrained model that fits it.
The modules here pretrain a backbone on such data with the same machinery fine-tuning uses
(a `Stage` through `run_schedule`, `tf.distribute`, mixed precision, checkpoints and resume,
a run directory), and write what the recipes read:

- `tfxfer.pretrain.masked_lm`: domain-adaptive masked-LM pretraining of a BERT backbone; it
  writes a keras-hub preset directory the text recipe takes as `--backbone DIR`.
- `tfxfer.pretrain.contrastive`: SimCLR-style contrastive pretraining of an image backbone;
  it writes a weights file the image recipe takes as `--weights PATH`.
- `tfxfer.pretrain.skeleton`: the config fields and the one run every pretraining recipe
  shares.

A finished pretraining run directory is itself accepted where its output is
(`--backbone runs/mlm/`, `--weights runs/simclr/`).
"""
