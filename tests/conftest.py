import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))                    # tiny_models, tiny_tokenizers
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # llava_next_jax from the checkout
