"""Named HF-checkpoint tensors out of a trainer's model, for `Engine.update_weights` / WeightSender.

Each adapter has `is_sender` and `named_tensors()`, which every rank iterates to the end (the gathers
are collectives) and which yields `(hf_name, full_tensor)` on the sending rank only:
    hf.HFAdapter              a whole model in this process (HF PreTrainedModel or a gyre model)
    fsdp.FSDPAdapter          an FSDP2 model, gathered bucket by bucket
    megatron.MegatronAdapter  a megatron-core GPTModel with TP, PP and EP (+ load_hf_weights, the inverse)
"""
