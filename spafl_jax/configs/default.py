r"""The embedded default: SpaFL on scikit-learn's 8x8 digits, 20 clients. Runs anywhere, no download.

python experiments/main.py
python experiments/main.py --config=default.py --config.rounds=10 --workdir=/tmp/spafl_digits
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    # Data.
    config.dataset = 'digits'  # digits | fashion_mnist | cifar10 | cifar100
    config.data_dir = ''  # where datasets are (and are downloaded to); '' = defaults
    config.download = True  # fetch a missing dataset's published archives (checked)
    # Reporting: JSON lines and TensorBoard always; optional writers, comma-separated: wandb, clu.
    config.writers = ''
    config.raw_pixels = False  # True: feed raw 0..255 pixels like the official loaders
    config.augment = 'none'  # none | crop_flip (CIFAR: random crop pad 4 + flip)
    config.num_clients = 20  # N, every client persistent
    config.clients_per_round = 5  # S, sampled uniformly without replacement each round
    config.alpha = 0.5  # Dirichlet concentration of the non-IID split
    # Model and mask.
    config.model = 'digits_cnn'  # digits_cnn | lenet5 | conv4
    config.estimator = 'long_tailed'  # long_tailed | identity | outside_unit (step backward)
    config.client_init = 'shared'  # shared (one initial model for all, official) | independent
    # Local training.
    config.rounds = 50  # communication rounds
    config.batch_size = 16  # local batch size
    config.drop_last = True  # drop each epoch's last partial batch (False: official)
    config.collapse_check = 'current'  # collapse reset on the mask in use | previous (official)
    config.local_epochs = 5  # passes over a client's own data per round
    config.lr = 0.05  # SGD learning rate (momentum 0.9)
    config.lr_decay = 1.0  # lr multiplied by this every round
    config.min_lr = 0.0  # floor of the decayed lr
    config.clip = 0.0  # global-norm gradient clip; 0 disables
    config.th_coeff = 0.002  # weight of sum(exp(-threshold)) in the local loss
    config.penalty_warmup = False  # scale the penalty by sigmoid(10 r - 5)
    config.persistent_optimizer = False  # keep momentum across rounds (official FMNIST)
    # Server.
    config.importance_update = 'all_after'  # all_after | sampled_before | none
    # all_after kept as two numbers per client and row, applied when a client is read (exact to
    # float32 rounding; False: every client's weights updated every round, as the official code)
    config.lazy_importance = True
    config.aggregation = 'uniform'  # uniform | data_size (weighting of the threshold mean)
    # Method (spafl_jax/methods.py); the baselines ignore th_coeff, penalty_warmup, estimator,
    # importance_update and persistent_optimizer, and use `aggregation` for their own averages.
    config.method = 'spafl'  # spafl | fedavg | local | fedpm | heterofl | fedspa
    config.baseline = ml_collections.ConfigDict()  # the baselines' settings (docs/extending.md)
    config.baseline.fedpm_score_lr = 0.1  # lr of FedPM's mask scores; None = config.lr
    config.baseline.fedpm_score_optimizer = 'adam'  # adam (the paper) | sgd (clip + momentum)
    config.baseline.fedpm_weight_init = 'signed_constant'  # frozen weights: signed_constant | model
    config.baseline.fedpm_prior = 1.0  # Beta(prior, prior) prior of each probability
    config.baseline.fedpm_prior_reset_every = 1  # rounds between restarts of the Beta posterior
    config.baseline.fedpm_prob_clip = 0.01  # theta clipped to [c, 1 - c] before logit
    config.baseline.fedpm_eval_mask = 'threshold'  # threshold (theta > 0.5) | sample (fixed draw)
    config.baseline.heterofl_rates = (1.0, 0.5, 0.25)  # width of client k: rates[k % len(rates)]
    config.baseline.fedspa_density = 0.5  # FedSpa's fixed kept fraction of the weights
    config.baseline.fedspa_distribution = 'uniform'  # per-layer densities: uniform | erk
    config.baseline.fedspa_prune_rate = 0.5  # pruned and regrown fraction in round 0
    config.baseline.fedspa_anneal_rounds = 100  # the prune rate reaches 0 at this round
    config.baseline.fedspa_regrow = 'gradient'  # regrow by |dense gradient| | random
    # Execution.
    # auto | map | vmap: how the sampled clients run (auto: map on CPU, vmap on GPU and TPU)
    config.client_execution = 'auto'
    config.vmap_lanes = 0  # 'vmap': clients stepping at once per device; 0 = all
    config.eval_chunk = 32  # test examples per evaluation call (padding < this)
    config.eval_lanes = 0  # 'vmap': clients evaluated at once per device; 0 = vmap_lanes
    config.num_cpu_devices = -1  # CPU devices: -1 one per core (<= clients_per_round),
    # 0 JAX's one device, > 0 this many
    config.distributed = 'off'  # off | auto: a multi-host run whose platform says who is who
    # (TPU pods, Slurm, Open MPI, Kubernetes: jax.distributed.initialize() detects it)
    config.coordinator_address = ''  # 'host:port' of process 0 in a multi-host run (explicit)
    config.num_processes = 1  # processes of a multi-host run
    config.process_id = 0  # this process's index in a multi-host run
    config.conv_impl = 'auto'  # auto | im2col | xla: how convolutions are computed
    # (auto: im2col on CPU, XLA's convolutions elsewhere)
    config.compute_dtype = 'float32'  # float32 | bfloat16 (matmul inputs; parameters stay f32)
    config.scan_unroll = 1  # unroll of the scan over local steps
    # Evaluation and bookkeeping.
    config.eval_every = 1  # evaluate every this many rounds (and after the last round)
    # More clients than eval_panel: an evaluated round tests a fixed panel of this many clients
    # (drawn from the seed), and every eval_sweep_every rounds and after the last all of them.
    config.eval_panel = 1000
    config.eval_sweep_every = 100
    # Where the clients' models live between rounds: device (all of them on the devices, sharded
    # over the clients axis) | disk (one file per client in <workdir>/clients, the cohort read and
    # written each round, which is also their checkpoint; spafl_jax/store.py, docs/scale.md)
    config.client_store = 'device'
    config.seed = 1  # all randomness derives from (seed, round, client id)
    config.max_loss = 1e6  # a training loss above this stops the run (diverged)
    config.checkpoint_every = 10  # save a checkpoint every this many rounds (and at the end)
    # True: checkpoints gathered on the host and verified by a SHA-256 on restore. False: saved as
    # the state lies on the devices (each process its own shards) and asynchronously, restored onto
    # the devices; for states too large for one host (a resumed run keeps its run's form)
    config.checkpoint_digest = True
    config.sparsity_rounds = (1, 10, 25)  # also draw the first layer's sparsity pattern after these
    return config
