import sys

from npllm.cli import main

sys.exit(main())
