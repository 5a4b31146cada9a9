"""Stage 4, evaluation: real bitstreams on an image folder (``bitstreams``) and the image metrics
(``metrics``).

python -m hpcm.evaluate --checkpoint CKPT --dataset DIR --output OUT.csv --json OUT.json
"""
