r"""Quickstart: real Fashion-MNIST, a small ResNet, the whole FlexiQ pipeline on 2 CPU cores.

  python run.py --config=configs/quickstart.py --workdir=workdirs/quickstart

Arguments: `:smoke` shrinks everything to a few steps (for tests).
"""

import ml_collections

from flexiq_jax.config_utils import parse_arg


def get_config(arg=None):
  args = parse_arg(arg, smoke=False)
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.distributed = False  # True: jax.distributed.initialize() for multi-host runs

  config.model = ml_collections.ConfigDict()
  config.model.name = "resnet_small"
  config.model.kwargs = ml_collections.ConfigDict()
  config.init_weights = ""  # path to a timm checkpoint (.safetensors/.pth); "" = train from scratch

  config.data = ml_collections.ConfigDict()
  config.data.name = "fashion_mnist"
  config.data.data_dir = "/usr/share/datasets/fashion-mnist"
  config.data.train_split = "train"
  config.data.eval_split = "test"
  config.data.image_size = 28
  config.data.channels = 1
  config.data.eval_transform = "fashion_mnist"
  config.data.augment = False
  config.data.num_threads = 2
  config.data.eval_examples = -1  # -1: the whole eval split

  config.train = ml_collections.ConfigDict()
  config.train.batch_size = 128
  config.train.num_epochs = 2.0
  config.train.optimizer = "sgd"
  config.train.learning_rate = 0.1
  config.train.momentum = 0.9
  config.train.nesterov = True
  config.train.weight_decay = 5e-4
  config.train.schedule = "cosine"
  config.train.warmup_steps = 100
  config.train.label_smoothing = 0.0
  config.train.grad_clip_norm = 0.0
  # A loss above this factor x max(its first step's, 1) stops training (diverged without NaN); 0: off.
  config.train.divergence_factor = 10.0
  config.train.checkpoint_every_steps = 200
  config.train.log_every_steps = 50
  # Top-1/top-5/loss on the eval split every this many steps and at the end (eval.jsonl and
  # TensorBoard eval/); 0: never. Changes no result (not in the stage fingerprint).
  config.train.eval_every_steps = 200
  config.eval_batch_size = 500

  # FlexiQ (design notes, section 2). Every choice is a named option.
  config.calib = ml_collections.ConfigDict()
  config.calib.num_images = 512  # unlabelled, from the training split
  config.calib.batch_size = 128

  config.quant = ml_collections.ConfigDict()
  config.quant.skip = ()  # regexes on module paths: layers left in float
  config.quant.keep_8bit = ("first", "last")  # quantized, never lowered ('first'/'last' or regexes)
  config.quant.fold_bn = True
  config.quant.act_calibration = "minmax"  # 'minmax' | 'percentile' | 'mse'
  config.quant.percentile = 99.99
  config.quant.extraction = "fitted"  # 'fitted' (per-channel error-minimising) | 'naive' (drop 4 low bits)
  config.quant.bias_correction = True  # remove the mean output shift of lowered channels (calibrated)
  config.quant.attention = "int8"  # attention's q·kᵀ and attn·v: 'int8' (8-bit at every ratio) | 'float'
  # Lowerable layers' 8-bit weight scale max|w|/d per output channel (numerics.weight_grid):
  # 'max127' (d = 127) | 'max112' (d = 112, the 4-bit top at shift 4) | 'joint' (d fitted per channel)
  config.quant.weight_scale = "max127"

  config.select = ml_collections.ConfigDict()
  config.select.levels = (0.25, 0.5, 0.75, 1.0)  # ratio levels, nested selections
  config.select.selector = "evolutionary"  # 'evolutionary' | 'greedy' | 'uniform' | 'random'
  config.select.channel_order = "range"  # 'range' (small first) | 'random' (ablation)
  config.select.population = 12
  config.select.generations = 6
  config.select.fitness_batches = 2  # calibration batches scored per candidate
  config.select.fitness = "kl"  # 'kl' (to the float model) | 'ce' (to its predicted labels)

  config.finetune = ml_collections.ConfigDict()
  config.finetune.num_epochs = 0.5
  config.finetune.batch_size = 128
  config.finetune.optimizer = "sgd"
  config.finetune.learning_rate = 0.005
  config.finetune.momentum = 0.9
  config.finetune.nesterov = True
  config.finetune.weight_decay = 0.0
  config.finetune.schedule = "cosine"
  config.finetune.warmup_steps = 0
  config.finetune.label_smoothing = 0.0
  config.finetune.grad_clip_norm = 0.0
  config.finetune.divergence_factor = 10.0  # as train.divergence_factor
  # The finetuned model replaces serving/ only if, on judge_images held-out images (training images
  # it never saw, else the eval split), at ratios 0 and 1, its top-1 is at most judge_top1_drop
  # points below and its KL to float at most judge_kl_rise above the model it started from.
  config.finetune.judge_images = 1000  # 0: accept without judging
  config.finetune.judge_top1_drop = 2.0
  config.finetune.judge_kl_rise = 0.1
  config.finetune.lsq = False  # learnable activation scales
  config.finetune.lsq_weights = False  # learnable per-output-channel weight scales (LSQ)
  # LSQ's activation-scale gradient scale: 'qmax8' (1/sqrt(N·255), every channel as 8-bit) |
  # 'effective' (lowered channels counted on their 4-bit grid, 2^e coarser: finetune.lsq_scale_gradient)
  config.finetune.lsq_grad_scale = "qmax8"
  config.finetune.lsq_learning_rate = 0.0  # learning rate of the learnt scales; 0 = finetune.learning_rate
  config.finetune.distill_weight = 0.5  # weight of KL(float || quantized) in the loss
  config.finetune.levels = ()  # ratio levels sampled per step; () = 0 and select.levels
  config.finetune.uniform_prob = 0.5  # share of steps at a ratio uniform in [0, 1] (between levels)
  config.finetune.refresh = "auto"  # re-estimate weight_e and bias-correction means after QAT: auto|always|never
  # Layer inputs the refresh's bias-correction means come from: 'float' (the float forward of the
  # finetuned weights) | 'quantized' (the quantized model's own inputs, at ratios 0.5 and 1)
  config.finetune.refresh_source = "float"
  config.finetune.level_probs = ()  # () = uniform
  # Ratios trained at every step besides the sampled one (loss averaged over them), e.g. (0.0, 1.0)
  config.finetune.every_step_ratios = ()
  config.finetune.checkpoint_every_steps = 100
  # As train.eval_every_steps, for the fake-quant model at ratios 0, 0.5 and 1, with KL and
  # agreement to the float model; 0: never.
  config.finetune.eval_every_steps = 100

  config.sweep = ml_collections.ConfigDict()
  config.sweep.ratios = (0.0, 0.1, 0.25, 0.37, 0.5, 0.62, 0.75, 0.9, 1.0)  # levels and ratios between them

  # Layer-wise mixed precision (design notes, section 3; flexiq_jax.layerwise).
  config.layerwise = ml_collections.ConfigDict()
  config.layerwise.candidates = ("W8A8", "W4A8", "W4A4")  # 'W<w>A<a>' or 'FP'
  # Phase 2 starts every group here; 'auto' (as AIMET): the best-scoring uniform candidate.
  config.layerwise.baseline = "auto"
  # Quantizer groups: 'shared_input' (as AIMET: the layers reading one tensor share a candidate)
  # or 'per_layer' (each layer's weight and input alone).
  config.layerwise.grouping = "shared_input"
  # Recompute the min-max activation ranges for each candidate, as AIMET recomputes encodings
  # (uniform candidates; once per candidate in phase 1; the baseline's for the Pareto points).
  config.layerwise.recalibrate = True
  config.layerwise.act_range = "minmax"  # activation ranges: 'minmax' | 'mse' (fitted per bit width)
  config.layerwise.weight_range = "minmax"  # per-output-channel weight ranges: 'minmax' | 'mse'
  config.layerwise.sensitivity_images = 256  # phase 1: unlabelled calibration images, SQNR vs float
  # Phases 2/3 score the last score_examples images of this split (a validation slice of train,
  # distinct from the test split the reports measure the drop on).
  config.layerwise.score_split = "train"
  config.layerwise.score_examples = 2000
  config.layerwise.allowed_drop = 1.0  # top-1 points below the float model on the score images
  config.layerwise.search = "binary"  # phase 3: 'binary' | 'interpolation' | 'brute_force'
  config.layerwise.phase2_full = True  # score every Pareto point (for the plot), not only the probed ones
  config.layerwise.flexiq_ratios = (0.0, 0.25, 0.5, 0.75, 1.0)  # candidates of the FlexiQ variant

  # run.py --mode=compare (flexiq_jax.compare).
  config.compare = ml_collections.ConfigDict()
  config.compare.methods = ("flexiq", "flexiq_naive", "flexiq_random", "flexiq_uniform", "flexiq_greedy",
                            "flexiq_no_bias_correction", "flexiq_amp", "layerwise_amp",
                            "ptq_minmax", "ptq_mse", "adaround", "lsq_qat")
  config.compare.allowed_drops = (0.25, 1.0, 3.0)  # one layer-wise AMP point each
  config.compare.finetune = True  # FlexiQ's multi-ratio finetuning (and LSQ QAT gets the same budget)
  config.compare.ablation_ratios = ()  # ratios the flexiq_* ablation variants are swept at; () = sweep.ratios
  config.compare.keep_ends = True  # uniform baselines keep the first/last layer W8A8, as FlexiQ does
  # AdaRound (compare.adaround): the paper's 10k iterations of batch 32 at Adam 1e-3 per layer,
  # scaled to 500 at 1e-2 for the CPU budget; calibration images it reconstructs on.
  config.compare.adaround_iterations = 500
  config.compare.adaround_images = 256
  config.compare.lsq_init = "mse"  # LSQ scales start from 'minmax' | 'mse' PTQ ranges
  # LSQ QAT gets FlexiQ's finetuning budget and recipe except the learning rate: at FlexiQ's
  # (mostly 8-bit) rate, uniform W4A4 QAT ends below its own PTQ starting point; <= 0: same rate.
  config.compare.lsq_learning_rate = 0.001
  config.compare.results_prefix = ""  # also write <prefix>.json/.md/.png (e.g. experiments/results/compare_x)

  if args["smoke"]:
    config.train.num_epochs = 0.02
    config.train.checkpoint_every_steps = 5
    config.train.log_every_steps = 5
    config.train.warmup_steps = 2
    config.data.eval_examples = 500
    config.calib.num_images = 64
    config.calib.batch_size = 32
    config.select.population = 4
    config.select.generations = 2
    config.select.fitness_batches = 1
    config.finetune.num_epochs = 0.01
    config.finetune.checkpoint_every_steps = 2
    config.finetune.judge_images = 256
    config.train.eval_every_steps = 0
    config.finetune.eval_every_steps = 0
    config.layerwise.sensitivity_images = 32
    config.layerwise.score_examples = 128
    config.compare.allowed_drops = (1.0,)
    config.compare.adaround_iterations = 20
  return config
