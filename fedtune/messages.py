"""Names of the records and keys in fedtune's messages; Flower's own keys are kept as they are."""

# Flower's strategies read and write these.
ARRAYS = "arrays"  # the trainable tensors, keyed by state-dict name
CONFIG = "config"
METRICS = "metrics"
NUM_EXAMPLES = "num-examples"  # FedAvg's weighting key
SERVER_ROUND = "server-round"
PROXIMAL_MU = "proximal-mu"  # set by Flower's FedProx

# fedtune's own.
BACKBONE = "fedtune.backbone"  # ArrayRecord: the full initial model, only for a node that lacks it
CLIENT_CONFIG = "fedtune.client-config"  # JSON of the settings a client needs
MODEL_HASH = "fedtune.model-hash"  # content hash of the full initial model
TRAINABLE_STAGES = "fedtune.trainable-stages"  # stages that train (and travel) this round
HAS_MODEL = "fedtune.has-model"  # query reply: 1 if the node holds the model with MODEL_HASH
PARTITION = "fedtune.partition"  # query reply: the node's partition-id, a label for the server's log lines only
# In a message's config: the virtual client a simulation node plays for it (fedtune/server/transport.py);
# a real node refuses them: its data and its identity are its own.
VIRTUAL_PARTITION = "fedtune.virtual-partition"  # the client's partition, 0..clients-1
VIRTUAL_CLIENTS = "fedtune.virtual-clients"  # how many clients the federation has
# Evaluate reply metrics under personalization: the client's own model (global + its personal tensors).
PERSONAL_LOSS = "personal_loss"
PERSONAL_ACCURACY = "personal_accuracy"
EPSILON = "epsilon"  # train reply metric: the client's DP-SGD epsilon over the run so far
NOISE_MULTIPLIER = "dp-noise-multiplier"  # train reply metric: the DP-SGD noise the client calibrated
SAMPLE_RATE = "dp-sample-rate"  # train reply metric: the client's DP-SGD sampling rate (1 / batches)
# In a round's config, central DP under SecAgg+ when the Poisson draw is a single client (no sum to
# hide its update in): the standard deviation of the Gaussian noise that client adds to its clipped
# update before sending it (fedtune/server/round.py, train_alone).
OWN_NOISE_STDDEV = "fedtune.own-noise-stddev"
# How a client's refusal to train past its privacy budget begins, so the server can tell it apart
# from a failure (it travels as the reason of an error reply).
PRIVACY_REFUSAL = "privacy budget exhausted"
# How a node's error reply begins when it lacks the model it was told to train (never received,
# deleted, or found damaged and removed): the server sends the model again.
MODEL_MISSING = "model not cached"
# How a node's error reply begins when a message from the server failed the checks of
# fedtune/protocol.py; the rest names the field and the problem.
REFUSED = "refused the server's message"

# Under SecAgg+ (Flower's legacy FitIns layout): entries fedtune adds to the FitIns config.
# Legacy configs hold scalars only (Flower's compat layer rejects lists when it decodes them), and
# the legacy tensors are a bare list, so fedtune's train config travels as JSON and the tensor
# names as an explicit, ordered JSON list (fedtune/protocol.py encodes and parses them).
SECAGG_CONFIG = "fedtune.secagg.config"  # JSON of the round's train config
SECAGG_ARRAY_KEYS = "fedtune.secagg.array-keys"  # JSON list: the name of each legacy tensor, in order
SECAGG_CLIPPING_RANGE = "fedtune.secagg.clipping-range"  # the client refuses an update SecAgg+ would clip
SECAGG_MAX_WEIGHT = "fedtune.secagg.max-weight"  # the client refuses a num-examples above it

# Feature statistics for `fedtune select` (fedtune/statistics_protocol.py): a query of its own action,
# one message per node asking for every candidate; the reply holds one ArrayRecord per candidate.
STATISTICS = "statistics"  # the query's action: message type "query.statistics"
STATISTICS_SETTINGS = "fedtune.statistics.settings"  # list: each candidate's client settings (JSON)
STATISTICS_MODELS = "fedtune.statistics.models"  # list: each candidate's model hash
STATISTICS_STAGES = "fedtune.statistics.stages"  # list: the stage whose output is each candidate's feature
STATISTICS_RECORD = "fedtune.statistics."  # + the candidate's index: its statistics' ArrayRecord
GRAM = "gram"  # D x D: F^T F
GRAM_FACTOR = "gram-factor"  # R x D, in place of the gram when smaller: G with G^T G = F^T F
CLASS_SUMS = "class-sums"  # K x D
CLASS_COUNTS = "class-counts"  # K
STATISTICS_SECONDS = "seconds."  # + the candidate's index: reply metric, the client's compute seconds for it
# Under SecAgg+ only (fedtune/statistics_protocol.py, secure_vectors): the public bounds that make
# each client's statistics integers in a public range before they are masked.
STATISTICS_NORMS = "fedtune.statistics.norms"  # list: each candidate's feature norm bound (longer ones are clipped)
STATISTICS_MAX_EXAMPLES = "fedtune.statistics.max-examples"  # a client with more examples refuses
STATISTICS_LEVELS = "fedtune.statistics.levels"  # SecAgg+'s quantisation levels (a power of two), to split values by
