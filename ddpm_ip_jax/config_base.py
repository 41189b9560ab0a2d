"""The config schema: every knob of ddpm-ip-jax with the reference's defaults (`get_config`), and what every
paper run shares (`paper_config`).

The files under configs/ (cifar10.py, celeba64.py, digits.py, ...) start from these and change what the paper
changes (docs/method.md section 2). They live in this package, not in configs/, so that a config file can be
loaded from any working directory and the package installs no top-level `configs` module. Any field can be
overridden on the command line, e.g.
  python -m ddpm_ip_jax.main --config=configs/cifar10.py --workdir=runs/c10 \
      --config.training.batch_size=64 --config.diffusion.input_perturbation=0.1
"""
import ml_collections


def get_config():
  config = ml_collections.ConfigDict()
  config.seed = 0
  # JAX's persistent compilation cache (ddpm_ip_jax/runtime.py): "auto" (~/.cache/ddpm_ip_jax/xla), a folder, or
  # "none"; a second start of the same run loads the compiled step instead of compiling it.
  config.compilation_cache_dir = "auto"

  # ADM UNet (docs/method.md section 3). Names follow the reference's model builder.
  config.model = model = ml_collections.ConfigDict()
  model.image_size = 64
  model.in_channels = 3
  model.model_channels = 128          # reference flag `num_channels`
  model.num_res_blocks = 2
  model.channel_mult = ()             # () = the reference's default for the image size
  model.attention_resolutions = (16, 8)
  model.num_heads = 4
  model.num_head_channels = -1        # -1: use num_heads
  model.num_heads_upsample = -1       # -1: same as num_heads
  model.dropout = 0.0
  model.num_classes = 0               # 0: unconditional
  model.learn_sigma = False           # True: 2*in_channels outputs (eps and variance interpolation v)
  model.use_scale_shift_norm = True
  model.resblock_updown = False
  model.use_new_attention_order = False
  model.dtype = "float32"             # compute dtype: float32 | bfloat16 | float16 (params stay float32)
  # Rematerialisation in the backward pass: "" (off) | "convs" (recompute norms, activations, dropout between
  # the kept conv outputs) | "blocks" (recompute each res/attention block): less memory, same numbers.
  model.remat = ""

  # Gaussian diffusion (docs/method.md sections 1 and 4).
  config.diffusion = diffusion = ml_collections.ConfigDict()
  diffusion.steps = 1000
  diffusion.noise_schedule = "linear"  # linear | cosine
  diffusion.predict_xstart = False     # False: the network predicts eps
  diffusion.sigma_small = False        # without learned sigma: fixed small (True) or fixed large (False)
  diffusion.loss_type = "mse"          # mse | rescaled_mse (hybrid, the paper's) | kl | rescaled_kl
  diffusion.rescale_timesteps = False  # feed the network t * 1000 / steps (improved-diffusion's models), not t
  diffusion.input_perturbation = 0.0   # gamma of DDPM-IP; 0 = plain ADM (reference flag `input_pertub`)
  # constant (the paper) | uniform: gamma ~ U(0, input_perturbation) per example | linear: from
  # input_perturbation_start at t = 0 to input_perturbation at t = T-1.
  diffusion.input_perturbation_kind = "constant"
  diffusion.input_perturbation_start = 0.0

  config.training = training = ml_collections.ConfigDict()
  training.batch_size = 128            # global batch, split over all devices of all hosts
  training.num_train_steps = 500_000
  training.learning_rate = 1e-4
  training.adam_b1 = 0.9
  training.adam_b2 = 0.999
  training.adam_eps = 1e-8
  training.weight_decay = 0.0
  training.warmup_steps = 0
  training.grad_clip = 0.0             # 0: no clipping
  # A NaN/Inf loss or gradient norm stops the run (False) or only skips that update (True).
  training.skip_nonfinite_updates = False
  training.ema_rates = (0.9999,)
  training.schedule_sampler = "loss-second-moment"  # uniform | loss-second-moment
  training.steps_per_call = 1          # training steps per device call (lax.scan)
  # Images per device in one forward and backward pass; the step sums the gradients of the per-device batch's
  # micro-batches (lax.scan) before it averages them over the devices (reference flag `microbatch`, which is per
  # GPU too). 0: automatic (on a CPU the few images whose activations fit its cache: faster and leaner there;
  # elsewhere the whole per-device batch); -1: the whole per-device batch; n > 0: n, dividing it.
  training.microbatch = 0
  training.log_every_steps = 100
  training.tensorboard = True          # also write the metrics and grids as TensorBoard events (needs TensorFlow)
  training.checkpoint_every_steps = 10_000
  training.keep_checkpoints = 3        # the last K checkpoints ...
  training.keep_every_steps = 100_000  # ... plus every M-th step permanently (0: none)
  training.sample_every_steps = 10_000  # EMA sample grid (0: only at the end)
  training.num_grid_samples = 64
  training.grid_sampling_steps = "100"  # respacing used for the grids
  # Periodic FID of the EMA params during training (0: off; costs sampling time, so off by default).
  training.fid_every_steps = 0
  training.fid_num_samples = 1000
  training.fid_sampling_steps = "100"  # respacing of the FID samples
  training.fid_batch_size = 64        # samples per device per call
  training.fid_extractor = "inception"  # inception | digits (the digits classifier, for configs/digits.py)
  training.fid_weights = ""           # the extractor's weights file (never downloaded)
  training.fid_reference = ""         # reference statistics .npz ("": computed from the data into the workdir)

  config.data = data = ml_collections.ConfigDict()
  data.dataset = "digits"              # digits | cifar10 | celeb_a | lsun/tower | imagenet32 | npz | folder
  data.data_dir = ""                   # tfds data_dir, or the .npz file / image folder
  data.random_flip = True
  data.shuffle_buffer = 10_000
  data.download = False                # never download unless asked

  config.sampling = sampling = ml_collections.ConfigDict()
  sampling.sampler = "ancestral"       # ancestral | ddim
  sampling.timestep_respacing = ""     # "" = all steps; "250", "10,20,5", "ddim50"
  sampling.eta = 0.0                   # DDIM only
  sampling.clip_denoised = True
  sampling.use_ema = True
  return config


# The paper's networks by image size (docs/method.md section 2), 3 res blocks per level for all.
NETWORKS = {
    32: dict(model_channels=128, channel_mult=(1, 2, 2, 2), attention_resolutions=(16, 8),
             num_head_channels=32, dropout=0.3),    # 57,094,662 parameters
    64: dict(model_channels=192, channel_mult=(1, 2, 3, 4), attention_resolutions=(32, 16, 8),
             num_head_channels=64, dropout=0.1),    # 295,136,454 parameters
    128: dict(model_channels=256, channel_mult=(1, 1, 2, 3, 4), attention_resolutions=(32, 16, 8),
              num_head_channels=64, dropout=0.1),   # 542,811,398 parameters
}


def paper_config(image_size, *, gamma, batch_size, dataset):
  """What every DDPM-IP paper run shares (docs/method.md section 2): ADM, cosine schedule, learned range
  variance with the hybrid loss, scale-shift norm, res-block up/down, new attention order, loss-second-moment
  sampling, AdamW 1e-4, one EMA at 0.9999; and the paper's network of `image_size`."""
  config = get_config()
  config.model.image_size = image_size
  config.model.update(NETWORKS[image_size])
  config.model.num_res_blocks = 3
  config.model.learn_sigma = True
  config.model.use_scale_shift_norm = True
  config.model.resblock_updown = True
  config.model.use_new_attention_order = True
  # The reference trains in fp16; bfloat16 is the TPU/GPU equivalent (params and EMA stay float32).
  config.model.dtype = "bfloat16"
  config.diffusion.steps = 1000
  config.diffusion.noise_schedule = "cosine"
  config.diffusion.loss_type = "rescaled_mse"
  config.diffusion.input_perturbation = gamma
  config.training.batch_size = batch_size  # global, over all devices and hosts
  config.training.schedule_sampler = "loss-second-moment"
  config.training.learning_rate = 1e-4
  config.training.ema_rates = (0.9999,)
  config.data.dataset = dataset
  return config
