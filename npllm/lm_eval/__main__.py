"""``python -m npllm.lm_eval``: lm-evaluation-harness's command line, with the ``npllm`` model."""
import sys

from npllm.lm_eval import main

sys.exit(main())
