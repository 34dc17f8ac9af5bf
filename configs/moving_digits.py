"""Moving digits (procedural moving MNIST), class-conditional video DFM: the CPU video default.

Clips of 8 frames at 40x40 px with one 28x28 MNIST digit bouncing around (`data.source =
'moving_digits'`, `data/moving_digits.py`; label = the digit's class, 10,000 clips, drawn on
the fly, deterministic per index). 40 px rather than 32 px leaves the digit 12 px of room to
move (at 32 px it could only wiggle by 4 px). Two Laplacian stages halve space only
(`decomposition.halve_time=False`): 8x20x20 -> 8x40x40. Frames are patchified independently
with 3D RoPE: patch 5 on the coarse stage, 10 on the fine one, so 8 frames x 4 x 4 = 128 tokens.
The model is 128 wide and 4 deep (1.4M parameters); sized for a 2-core CPU: 1.8-2.2 steps/s of 32
clips on 2 cores shared with light jobs, so the default 1,600 steps take 12-15 minutes (plus a
minute of compiling and grids). What that buys (docs/benchmarks.md, "Video"): at cfg 3.0 (the paper's
value for qualitative samples, used for the grids) the digits move and a "1" or "7" reads in most
clips, but other digits still change shape from frame to frame; an MNIST classifier reads the
conditioning digit in 35% of the generated frames (98% of real frames; mean of 3 seeds,
docs/quality_video_results.json). More steps help
(`--config.total_steps=N`).

Train (periodic GIF/contact-sheet grids in workdir/samples, TensorBoard in workdir/tb):

  python -m dfm_jax.main --config=configs/moving_digits.py --workdir=workdirs/mdigits

Sample (workdir/samples/final_step{N}.{gif,mp4,png,npz,json}) and evaluate (frame FID, and the
per-frame digit accuracy and motion statistics against real clips):

  python -m dfm_jax.main --config=configs/moving_digits.py --workdir=workdirs/mdigits \\
      --mode=sample
  python -m dfm_jax.main --config=configs/moving_digits.py --workdir=workdirs/mdigits \\
      --mode=eval

Flow-matching twin (one stage, same backbone, tokens and sampling steps):

  python -m dfm_jax.main --config=configs/moving_digits.py:fm --workdir=workdirs/mdigits_fm

Smoke run in seconds: `configs/moving_digits.py:runlocal` (or `:fm,runlocal`). Other choices:
`--config.data.frames=16`, `--config.decomposition.halve_time=True` (the coarse stage then also
has half the frames; the fine stage gets a temporal patch of 2, tokens unchanged).
"""

from dfm_jax.config_defaults import apply_variants, base_config, parse_variants


def get_config(arg: str = "dfm"):
  variants = parse_variants(arg, ("fm", "runlocal"))
  c = base_config()
  c.total_steps = 1600
  c.batch_size = 32
  c.log_every = 25
  c.checkpoint_every = 400
  c.sample_every = 400
  c.num_grid_samples = 10  # one clip per class in the periodic GIF grid

  c.data.source = "moving_digits"
  c.data.frames = 8
  c.data.resolution = 40
  c.data.channels = 1
  c.data.num_videos = 10_000
  c.data.num_digits = 1
  c.data.random_flip = False  # a mirrored digit is not a digit
  c.data.num_classes = 10

  c.decomposition.kind = "laplacian"
  c.decomposition.num_stages = 2
  c.decomposition.halve_time = False

  c.model.hidden_size = 128
  c.model.depth = 4
  c.model.num_heads = 4
  c.model.patch_size = 5  # 20x20 coarse frames -> 4x4 tokens; the 40x40 stage uses 10x10
  c.model.pos_embed = "rope"  # 3D RoPE over (frame, row, column)

  c.flow.stage_probs = (0.7, 0.3)

  c.optim.learning_rate = 1e-3
  c.optim.warmup_steps = 50
  c.optim.weight_decay = 0.0
  c.optim.ema_decay = 0.99

  c.sampler.cfg_scale = 3.0  # the paper's value for qualitative samples; compare at 1.0
  c.sampler.steps_per_stage = (20, 10)
  c.sampler.thresholds = (0.7,)
  c.sampler.num_samples = 40
  c.sampler.batch_size = 20

  c.eval.metrics = ("frame_fid", "motion", "fvd")  # fvd runs when eval.i3d_weights is set
  c.eval.num_samples = 200
  c.eval.batch_size = 50
  c.eval.num_real = 200
  c.eval.frame_fid_frames = 4  # frames per clip scored by the frame FID (0: all)
  c.eval.i3d_weights = ""  # i3d_pretrained_400.pt enables 'fvd' (8 frames resampled to 16)
  c.eval.i3d_batch = 8
  c.eval.classifier = "mnist5k"  # per-frame digit accuracy (the motion metric); as default.py
  return apply_variants(c, variants)
