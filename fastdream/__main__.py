# SPDX-License-Identifier: Apache-2.0
import sys

from fastdream.cli import main

sys.exit(main())
