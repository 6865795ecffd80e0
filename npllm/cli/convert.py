"""``npllm convert MODEL.gguf OUT_DIR``: a GGUF file into a Hugging Face-style folder."""


def add_parser(sub):
    p = sub.add_parser(
        "convert", help="convert a GGUF file into a safetensors folder",
        description="Dequantize a Llama-architecture GGUF file to float32 and write a Hugging Face "
                    "style folder (config.json, model.safetensors, tokenizer.json, "
                    "tokenizer_config.json; and model.ggml.safetensors, the Q4_1 / Q8_0 "
                    "matrices in their blocks, which decoding reads). The Q/K rows permuted by "
                    "llama.cpp are restored to the rotate_half RoPE layout. Written atomically.")
    p.add_argument("gguf", help="the .gguf file")
    p.add_argument("out_dir", help="the folder to create (must not exist)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args):
    from npllm.model.gguf import convert_gguf
    out = convert_gguf(args.gguf, args.out_dir, progress=not args.quiet)
    print(out)
