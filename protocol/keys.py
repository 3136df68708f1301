"""Every record name and key that the server and the sites exchange (the specification is in
:mod:`protocol`)."""

from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

# Records of a message's RecordDict. Flower's strategies name the weights "arrays" and the
# configuration "config" when they build train and evaluate messages.
ARRAYS = "arrays"
CONFIG = "config"
METRICS = "metrics"
PRIVACY = "privacy"
REFUSAL = "refusal"
FAILURE = "failure"
MISSING_AUTOENCODER = "missing-autoencoder"
FEATURE_STATS = "feature-stats"
SEGMENTATION = "segmentation"

# Keys of the "config" record the server sends.
EXPERIMENT_CONFIG = "experiment-config"
PHASE = "phase"
NUM_ROUNDS = "num-rounds"
MANIFEST_PATH = "manifest-path"
STUDY_ID = "study-id"
SITE_STATE_ROOT = "site-state-root"
PROGRESS_DIR = "progress-dir"
KNOWN_LEDGERS = "known-ledgers"
CENTRAL_DP = "central-dp"
AUTOENCODER_DIGEST = "autoencoder-digest"
LATENT_SCALE = "latent-scale"
FID_STATS = "fid-stats"
QUERY = "query"
WANT_STATS = "want-stats"
# ... and the keys Flower's strategies add to it.
SERVER_ROUND = "server-round"
PROXIMAL_MU = "proximal-mu"
CLIPPING_NORM = KEY_CLIPPING_NORM

# Kinds of QUERY message (the value of "query").
INSTALL_AUTOENCODER = "install-autoencoder"
SET_LATENT_SCALE = "latent-scale"
SEGMENTATION_UTILITY = "segmentation-utility"

# Keys of the small records of replies.
LEDGER = "ledger"
REASON = "reason"
TRACEBACK = "traceback"
DIGEST = "digest"
FEATURE_MEAN = "mean"
FEATURE_COV = "cov"
REGIONS = "regions"

# Metric keys. The names with underscores are also the columns of the server's metrics.csv.
NUM_EXAMPLES = "num-examples"
SITE_INDEX = "site-index"
TRAIN_LOSS = "train_loss"
STEPS = "steps"
SECONDS = "seconds"
EVAL_LOSS = "eval_loss"
FEATURE_COUNT = "feature-count"
EPSILON = "epsilon"
DELTA = "delta"
NOISE_MULTIPLIER = "noise_multiplier"
SAMPLE_RATE = "sample_rate"
CLIP_FRACTION = "clip_fraction"
BUDGET_EXHAUSTED = "budget_exhausted"
PRIVACY_UNIT = "privacy_unit"  # what the site's epsilon protects: 1 = one patient (all its records), 0 = one record
PRIVACY_UNITS = "privacy_units"  # patients (or records) at the site: the N of delta = 1/(10 N)
RECORDS_PER_PATIENT = "records_per_patient"  # k, records of a sampled patient per step (1 at the record unit)
INSTALLED = "installed"
COUNT = "count"
TOTAL = "total"
TOTAL_SQ = "total-sq"
NUM_REAL_TRAIN = "num_real_train"
NUM_SYNTHETIC = "num_synthetic"
NUM_REAL_TEST = "num_real_test"
#: The columns of a site's segmentation report: segmenters trained on real, synthetic and real +
#: synthetic pairs scored on real held-out pairs, and mask fidelity (the real-only segmenter on the
#: generated images). Each region's Dice travels as "dice/<column>/<region>" and the held-out
#: images that hold the region as "cases/<column>/<region>".
SEGMENTATION_COLUMNS = ("real_only", "synthetic_only", "real_plus_synthetic", "mask_fidelity")
DICE = "dice"
CASES = "cases"
#: A site's translation scores on its held-out pairs (target units: HU for CT); NaN when the
#: phase does not translate.
TRANSLATION_SSIM = "translation_ssim"
TRANSLATION_PSNR = "translation_psnr"
TRANSLATION_MAE = "translation_mae"
TRANSLATION_METRIC_KEYS = (TRANSLATION_SSIM, TRANSLATION_PSNR, TRANSLATION_MAE)

#: The privacy metrics of every train reply (a site without DP sends epsilon = inf).
PRIVACY_METRIC_KEYS = (EPSILON, DELTA, NOISE_MULTIPLIER, SAMPLE_RATE, CLIP_FRACTION, BUDGET_EXHAUSTED, PRIVACY_UNIT,
                       PRIVACY_UNITS, RECORDS_PER_PATIENT)
#: Every train reply carries exactly these metric keys, from every site: Flower ends the run when
#: the replies it aggregates differ in their keys, and it weights the average by "num-examples".
TRAIN_METRIC_KEYS = (NUM_EXAMPLES, TRAIN_LOSS, STEPS, SITE_INDEX, SECONDS, *PRIVACY_METRIC_KEYS)
#: An evaluate reply carries these, plus "feature-count" when it carries feature statistics.
EVALUATE_METRIC_KEYS = (NUM_EXAMPLES, EVAL_LOSS, SITE_INDEX, *TRANSLATION_METRIC_KEYS)
QUERY_METRIC_KEYS = (SITE_INDEX, INSTALLED, COUNT, TOTAL, TOTAL_SQ)
#: A segmentation reply carries these, plus a Dice and a case count per column and region.
SEGMENTATION_METRIC_KEYS = (SITE_INDEX, NUM_REAL_TRAIN, NUM_SYNTHETIC, NUM_REAL_TEST, SECONDS)
