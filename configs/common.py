r"""Shared body of the per-model configs (`configs/<model>.py`); not a config itself.

Every per-model config is `common.model_config(<canonical name>, **parse_arg(arg, ...))` and has
exactly the fields of `configs/quickstart.py` (tests/test_configs.py checks names and types). Three
settings:

* default: ImageNet (TFDS `imagenet2012`, 224 px, the model's timm eval preprocessing), timm's
  pretrained weights converted to `weights/<timm tag>.safetensors`, no float training
  (`train.num_epochs = 0`), FlexiQ calibration on 1024 training images, evolutionary selection
  at ratio levels (0.25, 0.5, 0.75, 1.0), a few epochs of multi-ratio QAT, a sweep of nine ratios
  (the levels, 0, and four ratios between levels).
* `:fmnist`: the same family at reduced width/depth (`models.variants.small_kwargs`) trained from
  scratch on real Fashion-MNIST (28x28, 1 channel), then the same FlexiQ pipeline.
* `:smoke`: a few steps of everything (combinable: `:fmnist,smoke`).

Producing the weights file (once, on a machine with timm and internet access):

  mkdir -p weights && python -c "import timm, safetensors.torch as st; \
m = timm.create_model('resnet18.a1_in1k', pretrained=True); \
st.save_file({k: v.contiguous() for k, v in m.state_dict().items()}, 'weights/resnet18.a1_in1k.safetensors')"

(with the model's tag from `TIMM_TAGS` below; in this repository import timm through
`tests/timm_reference.py`'s `import_timm()`: `from tests import timm_reference` from the repository
root). `models.load_timm` checks every key and shape.

Hyper-parameter sources (see the comments where they are set):
* eval preprocessing: timm's pretrained configs (`flexiq_jax/data/preprocess.py`, design notes §7;
  tests/test_configs.py compares them with timm's metadata).
* `:fmnist` float training (from scratch, 28 px): CNNs the quickstart's SGD recipe (lr 0.1, wd 5e-4,
  50 warmup steps); transformers AdamW lr 1e-3, wd 0.05 (DeiT's), 100 warmup steps, gradient
  clipping 1.0, DeiT with label smoothing 0.1 (its paper's recipe; ViT and DeiT are one
  architecture at one size, `models.variants`). Not tuned. One epoch for all: the eleven-model
  sweep (experiments/paper_tables.py) must fit about three hours on 2 CPU cores, so the `:fmnist`
  recipes are sized to that budget (5 then 2 epochs before; the float training of the
  transformers was most of the time). The transformers end underfit (below the CNNs); the
  tables report each float accuracy.
* calibration and selection: 1024 ImageNet images (a small unlabelled set, design notes §2-3); the
  evolutionary search at flexiq_jax.select.evolutionary's defaults (population 16, 10 generations).
* QAT finetuning: NVIDIA pytorch-quantization's QAT guidance ("about 10% of the original schedule,
  starting at 1% of the initial training learning rate, cosine annealing") and MQBench's QAT
  recipe (SGD, weight decay 0, the float model's final learning rate, ~6 epochs). CNNs: 1% of the
  standard ImageNet SGD rate 0.1 per 256 images (Goyal et al. 2017) = 5e-4 at batch 128. ViT/DeiT/
  Swin: AdamW at 1% of DeiT's peak rate 5e-4 per 512 images (Touvron et al. 2021) = 1.25e-6 at
  batch 128. Epochs: 3, far below "10% of the schedule" (9 CNN / 30 DeiT epochs), as a one-GPU
  budget; raise `finetune.num_epochs` for the paper's numbers. `:fmnist`: 0.2 epochs (94 steps) at
  1% of the float rate, for the sweep's three-hour budget; LSQ gets the same steps. For the same
  budget `:fmnist` calibrates on 256 images and evaluates on the first 5000 test images.
* Learning rates are computed for the batch sizes set here; an override of a batch size on the
  command line does not rescale them (override `learning_rate` too).
"""

from __future__ import annotations

import ml_collections

from flexiq_jax import models
from flexiq_jax.data import fashion_mnist

# Canonical model name -> the timm tag whose pretrained weights the config expects (from each
# architecture's `models.ModelSpec`, as every model list is).
TIMM_TAGS = {spec.name: spec.timm_tag for spec in models.specs()}

IMAGENET_TRAIN_EXAMPLES = 1_281_167
FMNIST_HOLDOUT = 5_000  # training images kept out of training, for choices made on held-out data
FMNIST_TRAIN_EXAMPLES = fashion_mnist.SPLIT_SIZES["train"] - FMNIST_HOLDOUT  # the images the :fmnist configs train on


def is_transformer(name: str) -> bool:
  return models.spec(name).transformer


def weights_path(name: str) -> str:
  return f"weights/{TIMM_TAGS[name]}.safetensors"


def _float_recipe(transformer: bool, fmnist: bool, batch_size: int, deit: bool = False,
                  depthwise: bool = False) -> dict:
  """train.* values other than batch size and logging."""
  # From scratch on Fashion-MNIST, with `data.augment` (flip + 2-pixel shift): trained, not
  # underfit (CNNs >= 90 %, transformers >= 86 % on the test split is the aim; the curves are
  # in experiments/results/float_recipes.md).
  if fmnist and transformer:  # AdamW with a one-epoch warmup, as ViTs are trained (DeiT: wd 0.05)
    # DeiT's recipe adds label smoothing 0.1 (Touvron et al. 2021); at one size ViT and DeiT
    # are one architecture, so the recipe is what tells them apart here.
    # 20 epochs: at 10 DeiT-T ended at 84.28 % (aim 86), still rising (float_recipes.md).
    return dict(num_epochs=20.0, optimizer="adamw", learning_rate=1e-3, weight_decay=0.05,
                warmup_steps=FMNIST_TRAIN_EXAMPLES // batch_size, label_smoothing=0.1 if deit else 0.0,
                grad_clip_norm=1.0)
  if fmnist:  # SGD with Nesterov momentum, cosine to 0
    # The depthwise family (MobileNetV2, EfficientNet) decays its weights 10x less, as MobileNetV2
    # was trained (4e-5, Sandler et al. 2018): at 5e-4 the reduced MobileNetV2 underfit (train
    # accuracy 81 % after 5 epochs; experiments/results/float_recipes.md).
    # The depthwise family clips the gradient norm at 2 (about twice its usual size): MobileNetV2
    # runs spiked where the rate reached 0.1 (train accuracy 72 % -> 58 % at step 150 after 50
    # warmup steps, ending at 85.24 %; 79 % -> 51 % at step 500 after a one-epoch warmup; grad
    # norms 6-7 against about 1).
    return dict(num_epochs=5.0, optimizer="sgd", learning_rate=0.1, weight_decay=4e-5 if depthwise else 5e-4,
                warmup_steps=50, label_smoothing=0.0, grad_clip_norm=2.0 if depthwise else 0.0)
  # Pretrained weights: no float training (num_epochs 0). The rest is used only if num_epochs is
  # raised (e.g. to continue training the imported model): CNNs Goyal et al.'s SGD (0.1 per 256
  # images, wd 1e-4), transformers DeiT's AdamW (5e-4 per 512 images, wd 0.05); 5 warmup epochs.
  warmup = 5 * IMAGENET_TRAIN_EXAMPLES // batch_size
  if transformer:
    return dict(num_epochs=0.0, optimizer="adamw", learning_rate=5e-4 * batch_size / 512, weight_decay=0.05,
                warmup_steps=warmup, label_smoothing=0.1, grad_clip_norm=0.0)
  return dict(num_epochs=0.0, optimizer="sgd", learning_rate=0.1 * batch_size / 256, weight_decay=1e-4,
              warmup_steps=warmup, label_smoothing=0.1, grad_clip_norm=0.0)


def _finetune_recipe(transformer: bool, fmnist: bool, batch_size: int, train_lr: float) -> dict:
  """Multi-ratio QAT: 1% of the float training rate (NVIDIA's QAT guidance, module docstring),
  cosine to 0, no weight decay (MQBench)."""
  if fmnist:
    # Every QAT method's rate is chosen from lr_grid on held-out training images: three rates a
    # half-decade (CNNs) or a decade (transformers) apart, spanning FlexiQ's 1% of the float rate
    # (1e-3 SGD / 1e-5 AdamW) and the QAT baselines' former 1e-3.
    # While an edge of the grid wins, up to two more rates beyond it (lr_grid_extend).
    grid = (1e-5, 1e-4, 1e-3) if transformer else (3e-4, 1e-3, 3e-3)
    return dict(num_epochs=0.2, optimizer="adamw" if transformer else "sgd", learning_rate=0.01 * train_lr,
                warmup_steps=0, lr_grid=grid, lr_grid_extend=2)
  if transformer:  # 1% of DeiT's 5e-4 per 512 images: 1.25e-6 at batch 128
    return dict(num_epochs=3.0, optimizer="adamw", learning_rate=0.01 * 5e-4 * batch_size / 512,
                warmup_steps=500, lr_grid=())
  # 1% of SGD's 0.1 per 256 images: 5e-4 at batch 128
  return dict(num_epochs=3.0, optimizer="sgd", learning_rate=0.01 * 0.1 * batch_size / 256, warmup_steps=0,
              lr_grid=())


def model_config(name: str, *, fmnist: bool = False, smoke: bool = False) -> ml_collections.ConfigDict:
  """The full config of canonical model `name` (a key of TIMM_TAGS)."""
  if name not in TIMM_TAGS:
    raise ValueError(f"no per-model config for {name!r}; known: {', '.join(sorted(TIMM_TAGS))}")
  transformer = is_transformer(name)
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.distributed = False  # True: jax.distributed.initialize() for multi-host runs

  config.model = ml_collections.ConfigDict()
  config.model.name = name
  # Constructor kwargs; {} = the architecture of the timm weights. `:fmnist` = reduced width/depth.
  config.model.kwargs = ml_collections.ConfigDict()
  # A timm checkpoint (.safetensors/.pth); "" = train from scratch. How to produce it from timm:
  # the module docstring.
  config.init_weights = "" if fmnist else weights_path(name)

  config.data = ml_collections.ConfigDict()
  if fmnist:
    config.data.name = "fashion_mnist"
    config.data.data_dir = "/usr/share/datasets/fashion-mnist"
    # The last 5000 training images are kept out of every training (the float one included): the
    # QAT methods' learning rates are chosen on them and the finetune's judge scores on them.
    config.data.train_split = f"train[:-{FMNIST_HOLDOUT}]"
    config.data.holdout_split = f"train[-{FMNIST_HOLDOUT}:]"
    config.data.eval_split = "test"
    config.data.image_size = ml_collections.FieldReference(28)
    config.data.channels = 1
    config.data.eval_transform = "fashion_mnist"  # normalisation only (no crop)
    config.data.augment = True  # random flip + 2-pixel shift of the training images
    config.data.num_threads = 2
  else:
    config.data.name = "imagenet2012"
    config.data.data_dir = ""  # "" = $TFDS_DATA_DIR or ~/tensorflow_datasets (docs/configs.md, "ImageNet")
    config.data.train_split = "train"
    config.data.holdout_split = ""  # as train_split, sliced apart: 'train[:-10000]' and 'train[-10000:]'
    config.data.eval_split = "validation"
    config.data.image_size = ml_collections.FieldReference(224)
    config.data.channels = 3
    config.data.eval_transform = name  # timm's eval preprocessing of these weights
    config.data.augment = True  # training augmentation: random-resized-crop + flip
    config.data.num_threads = 16  # JPEG decoding and resizing run in grain threads
  # -1: the whole eval split. `:fmnist`: its first 5000 of 10000 test images; each model is
  # evaluated about 40 times in the sweep (every ratio, method and ablation), which on the big
  # transformers was a third of its time. Methods are compared on the same images.
  config.data.eval_examples = 5000 if fmnist else -1

  if fmnist:
    config.model.kwargs.update({k: v for k, v in models.small_kwargs(name, 28).items() if k != "image_size"})
  if transformer:
    # Position embeddings / Swin windows are built for this size; follows --config.data.image_size
    # (timm weights trained at 224 get their position embeddings resized on import).
    config.model.kwargs.image_size = config.data.get_ref("image_size")

  config.train = ml_collections.ConfigDict()
  config.train.batch_size = 128
  recipe = _float_recipe(transformer, fmnist, config.train.batch_size, deit=models.spec(name).deit,
                         depthwise=models.spec(name).depthwise)
  config.train.num_epochs = recipe["num_epochs"]
  config.train.optimizer = recipe["optimizer"]  # 'sgd' | 'adamw'
  config.train.learning_rate = recipe["learning_rate"]
  config.train.momentum = 0.9  # sgd only
  config.train.nesterov = True  # sgd only
  config.train.weight_decay = recipe["weight_decay"]
  config.train.schedule = "cosine"
  config.train.warmup_steps = recipe["warmup_steps"]
  config.train.label_smoothing = recipe["label_smoothing"]
  config.train.grad_clip_norm = recipe["grad_clip_norm"]
  # A loss above this factor x max(its first step's, 1) stops training (diverged without NaN); 0: off.
  config.train.divergence_factor = 10.0
  config.train.checkpoint_every_steps = 500 if fmnist else 5000
  config.train.log_every_steps = 50 if fmnist else 200
  # Periodic evaluation during training (eval.jsonl, TensorBoard eval/); 0: only after training,
  # as the time-budgeted sweeps need. Changes no result (not in the stage fingerprint).
  # `:fmnist`: once an epoch (the training curve in float/eval.jsonl); ImageNet: only at the end.
  config.train.eval_every_steps = -(-FMNIST_TRAIN_EXAMPLES // config.train.batch_size) if fmnist else 0
  config.eval_batch_size = 512 if fmnist else 256  # multiples of 8 devices; the last batch is padded

  # FlexiQ (design notes, section 2). Every choice is a named option.
  config.calib = ml_collections.ConfigDict()
  config.calib.num_images = 256 if fmnist else 1024  # unlabelled, from the training split
  config.calib.batch_size = 128 if fmnist else 64

  config.quant = ml_collections.ConfigDict()
  config.quant.skip = ()  # regexes on module paths: layers left in float
  config.quant.keep_8bit = ("first", "last")  # stem/patch embedding and classifier: quantized, never lowered
  config.quant.fold_bn = True
  config.quant.act_calibration = "minmax"  # 'minmax' | 'percentile' | 'mse'
  config.quant.percentile = 99.99
  config.quant.extraction = "fitted"  # 'fitted' (per-channel error-minimising) | 'naive' (drop 4 low bits)
  config.quant.bias_correction = True  # remove the mean output shift of lowered channels (calibrated)
  config.quant.attention = "int8"  # attention's q·kᵀ and attn·v: 'int8' (8-bit at every ratio) | 'float'
  # Lowerable layers' 8-bit weight scale max|w|/d per output channel (numerics.weight_grid):
  # 'max127' (d = 127) | 'max112' (d = 112, the 4-bit top at shift 4) | 'joint' (d fitted per channel).
  # A config without the field means 'max127' (the grid of workdirs made before it existed).
  config.quant.weight_scale = "max112"
  # Signed inputs (after SiLU, GELU, a residual add): 'symmetric' (signed codes) | 'asymmetric'
  # (unsigned codes with a zero point, a multiple of 16 so that it survives the extraction, where
  # the calibrated error is smaller; calibrate.asymmetric_grid). A config without the field means
  # 'symmetric' (the grid of workdirs made before it existed).
  config.quant.act_grid = "asymmetric"
  # Cross-layer equalization (Nagel et al. 2019) of the BN-folded weights before calibration, for
  # every method alike; pairs through ReLU/identity only, each checked to keep the float function.
  config.quant.equalize = False

  config.select = ml_collections.ConfigDict()
  config.select.levels = (0.25, 0.5, 0.75, 1.0)  # ratio levels, nested selections
  config.select.selector = "evolutionary"  # 'evolutionary' | 'greedy' | 'uniform' | 'random'
  config.select.channel_order = "range"  # 'range' (small first) | 'random' (ablation)
  # ImageNet: flexiq_jax.select.evolutionary's defaults (16 x 10); Fashion-MNIST: the quickstart's.
  config.select.population = 12 if fmnist else 16
  config.select.generations = 6 if fmnist else 10
  config.select.fitness_batches = 2  # calibration batches scored per candidate
  config.select.fitness = "kl"  # 'kl' (to the float model) | 'ce' (to its predicted labels)

  config.finetune = ml_collections.ConfigDict()
  config.finetune.batch_size = 128
  recipe = _finetune_recipe(transformer, fmnist, config.finetune.batch_size, config.train.learning_rate)
  config.finetune.num_epochs = recipe["num_epochs"]
  config.finetune.optimizer = recipe["optimizer"]
  config.finetune.learning_rate = recipe["learning_rate"]
  config.finetune.momentum = 0.9  # sgd only
  config.finetune.nesterov = True  # sgd only
  config.finetune.weight_decay = 0.0
  config.finetune.schedule = "cosine"
  config.finetune.warmup_steps = recipe["warmup_steps"]
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
  # 'effective' (lowered channels counted on their 4-bit grid, 2^e coarser: numerics.lsq_extraction)
  config.finetune.lsq_grad_scale = "qmax8"
  # The same for the learnt weight scales (finetune.lsq_weights): 'qmax8' through the 8-bit weight
  # grid | 'effective' each lowered row on its own 4-bit grid.
  config.finetune.lsq_weight_grad_scale = "qmax8"
  config.finetune.seed_offset = 0  # added to the QAT's seed only (its batches and ratio draws)
  # A learnt output gain and bias per lowerable layer and output channel, scaled by the share of its
  # inputs lowered at the step's ratio (the identity at ratio 0; layer_ops.ratio_affine).
  config.finetune.ratio_affine = False
  # Before the QAT, each lowerable layer's 4-bit rounding learnt by AdaRound's reconstruction, the
  # 8-bit codes placed to extract to it (finetune.rounding): iterations per layer (0: round to
  # nearest) on the first rounding_images calibration images.
  config.finetune.rounding_iterations = 0
  config.finetune.rounding_images = 256
  config.finetune.rounding_ratios = (1.0,)  # the ratios whose output error the rounding reconstructs at once
  config.finetune.lsq_learning_rate = 0.0  # learning rate of the learnt scales; 0 = finetune.learning_rate
  # Learning rates every QAT method (FlexiQ, FlexiQ 100%-only, LSQ, switchable) trains its whole budget
  # at, keeping the best on lr_select_images held-out training images (never the eval split);
  # () = no selection: FlexiQ at finetune.learning_rate, the QAT baselines at compare.lsq_learning_rate.
  config.finetune.lr_grid = recipe["lr_grid"]
  config.finetune.lr_select_images = FMNIST_HOLDOUT if fmnist else 1000  # :fmnist: the whole holdout_split
  # Rates added one step beyond the grid while its largest or smallest rate wins (0: the grid only).
  config.finetune.lr_grid_extend = recipe.get("lr_grid_extend", 0)
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
  # Loss weight of each every-step ratio (the sampled ratio weighs 1); () = all 1
  config.finetune.every_step_weights = ()
  config.finetune.checkpoint_every_steps = 200 if fmnist else 2000
  config.finetune.eval_every_steps = 0  # as train.eval_every_steps (QAT: ratios 0, 0.5, 1, KL to float)

  config.sweep = ml_collections.ConfigDict()
  config.sweep.ratios = (0.0, 0.1, 0.25, 0.37, 0.5, 0.62, 0.75, 0.9, 1.0)  # levels and ratios between them

  # Layer-wise mixed precision (design notes, section 3; flexiq_jax.layerwise), as the quickstart.
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
  config.layerwise.sensitivity_images = 128 if fmnist else 256  # phase 1: unlabelled calibration images, SQNR vs float
  # Phases 2/3 score the last score_examples images of this split (a validation slice of train,
  # distinct from the eval split the reports measure the drop on).
  config.layerwise.score_split = "train"
  config.layerwise.score_examples = 1000 if fmnist else 2000
  config.layerwise.allowed_drop = 1.0  # top-1 points below the float model on the score images
  config.layerwise.search = "binary"  # phase 3: 'binary' | 'interpolation' | 'brute_force'
  config.layerwise.phase2_full = True  # score every Pareto point (for the plot), not only the probed ones
  config.layerwise.flexiq_ratios = (0.0, 0.25, 0.5, 0.75, 1.0)  # candidates of the FlexiQ variant

  # run.py --mode=compare (flexiq_jax.compare).
  config.compare = ml_collections.ConfigDict()
  config.compare.methods = ("flexiq", "flexiq_naive", "flexiq_random", "flexiq_uniform", "flexiq_greedy",
                            "flexiq_no_bias_correction", "flexiq_amp", "layerwise_amp",
                            "ptq_minmax", "ptq_mse", "adaround", "lsq_qat", "lsq_adaround", "switchable_qat",
                            "flexiq_100only",
                            "flexiq_reseed", "flexiq_max127", "flexiq_joint", "flexiq_sandwich", "flexiq_sandwich_w4",
                            "flexiq_long", "flexiq_ends", "flexiq_top", "flexiq_lsq", "flexiq_affine",
                            "flexiq_ends_affine", "flexiq_refresh_quantized", "flexiq_symmetric", "flexiq_distill",
                            "flexiq_rounding", "flexiq_rounding_joint", "flexiq_rounding_joint_lr")
  config.compare.allowed_drops = (0.25, 1.0, 3.0)  # one layer-wise AMP point each
  # Also AMP's Pareto point of the largest BOPs not above FlexiQ's 100 % point (uniform W4A4 with
  # the ends as keep_ends keeps them): the comparison at matched BOPs.
  config.compare.amp_at_4bit_budget = True
  config.compare.finetune = True  # FlexiQ's multi-ratio finetuning (and LSQ QAT gets the same budget)
  config.compare.ablation_ratios = ()  # ratios the flexiq_* ablation variants are swept at; () = sweep.ratios
  config.compare.keep_ends = True  # uniform baselines keep the first/last layer W8A8, as FlexiQ does
  # AdaRound (compare.adaround): the paper's 10k iterations of batch 32 at Adam 1e-3 per layer,
  # scaled to 500 at 1e-2 for the CPU budget (`:fmnist`: 100, for the sweep's three hours);
  # calibration images it reconstructs on.
  config.compare.adaround_iterations = 100 if fmnist else 500
  config.compare.adaround_images = 256
  config.compare.lsq_init = "mse"  # LSQ scales start from 'minmax' | 'mse' PTQ ranges
  # LSQ QAT gets FlexiQ's finetuning budget and recipe except the learning rate: at FlexiQ's
  # (mostly 8-bit) rate, uniform W4A4 QAT ends below its own PTQ starting point; <= 0: same rate.
  # Not read with finetune.lr_grid set (the QAT baselines' rate is then chosen from the grid).
  config.compare.lsq_learning_rate = 0.001
  config.compare.results_prefix = ""  # also write <prefix>.json/.md/.png (e.g. experiments/results/compare_x)

  if smoke:
    shrink_to_smoke(config, fmnist=fmnist)
  return config


def shrink_to_smoke(config: ml_collections.ConfigDict, *, fmnist: bool) -> ml_collections.ConfigDict:
  """`:smoke`: a few steps of every stage (tests, and a first check that a setup works).

  Args:
    config: a full config (changed in place).
    fmnist: whether it trains on Fashion-MNIST (else ImageNet: only a few finetuning steps).

  Returns:
    `config`.
  """
  if fmnist:
    config.train.num_epochs = 0.02  # 10 steps
    config.finetune.num_epochs = 0.01  # 5 steps
  else:
    config.finetune.num_epochs = 0.001  # 11 steps on ImageNet
  config.train.checkpoint_every_steps = 5
  config.train.log_every_steps = 5
  config.train.warmup_steps = 2
  config.data.eval_examples = 500
  config.calib.num_images = 64
  config.calib.batch_size = 32
  config.select.population = 4
  config.select.generations = 2
  config.select.fitness_batches = 1
  config.finetune.warmup_steps = 0
  config.finetune.checkpoint_every_steps = 2
  config.finetune.judge_images = 256
  config.finetune.lr_grid = ()  # one training per QAT method
  config.finetune.lr_grid_extend = 0
  config.train.eval_every_steps = 0
  config.finetune.eval_every_steps = 0
  config.layerwise.sensitivity_images = 32
  config.layerwise.score_examples = 128
  config.compare.allowed_drops = (1.0,)
  config.compare.adaround_iterations = 20
  return config
