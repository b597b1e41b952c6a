"""Ad-hoc A/B (session 17): the paged decode step's KV write + attention, pools as pointer arguments (HEAD's
kernel, index_copy_ writes) against pools read through the address table (paged_write + the new kernel)."""
import importlib.util, json, sys, torch
sys.path.insert(0, ".")
from verl_mega.rollout import paged_attention as new
spec = importlib.util.spec_from_file_location("old_pa", ".ab/old_paged_attention.py")
old = importlib.util.module_from_spec(spec); spec.loader.exec_module(old)

def bench(fn, iters=200):
    for _ in range(10): fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(20): fn()
    g.replay(); torch.cuda.synchronize()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    for _ in range(iters // 20): g.replay()
    e.record(); torch.cuda.synchronize()
    return s.elapsed_time(e) / iters * 1e3  # us per call

out = []
for name, hq, hkv, d, rows in [("0.5b", 14, 2, 64, 512), ("0.5b", 14, 2, 64, 64), ("7b", 28, 4, 128, 512), ("7b", 28, 4, 128, 32)]:
    torch.manual_seed(0)
    bs, width = 16, (1152 + 8 + 15) // 16
    blocks = rows * width + 1
    kp = torch.randn(blocks * bs, hkv, d, device="cuda", dtype=torch.bfloat16)
    vp = torch.randn_like(kp)
    lengths = torch.randint(128, 1152, (rows,), device="cuda")
    positions = lengths - 1
    tables = (torch.randperm(blocks - 1, device="cuda")[: rows * width] + 1).view(rows, width)
    q = torch.randn(rows, hq, d, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(rows, hkv, d, device="cuda", dtype=torch.bfloat16); v = torch.randn_like(k)
    slots = tables.gather(1, (positions // bs)[:, None])[:, 0] * bs + positions % bs
    addresses = torch.zeros(3, 2, dtype=torch.int64, device="cuda")
    addresses[1] = torch.tensor([kp.data_ptr(), vp.data_ptr()])
    def run_old():
        kp.index_copy_(0, slots, k); vp.index_copy_(0, slots, v)
        return old.paged_decode_attention(q, kp, vp, tables, positions, bs)
    def run_new():
        new.paged_write(k, v, slots, kp, vp, addresses, 1)
        return new.paged_decode_attention(q, kp, vp, tables, positions, bs, addresses, 1)
    a, b = run_old(), run_new()
    t_old, t_new = bench(run_old), bench(run_new)
    kv_bytes = float(lengths.sum()) * hkv * d * 2 * 2
    r = {"shape": name, "rows": rows, "max_abs_diff": float((a.float() - b.float()).abs().max()),
         "old_us": round(t_old, 2), "new_us": round(t_new, 2), "new_vs_old": round(t_old / t_new, 3),
         "new_TBps": round(kv_bytes / t_new / 1e6, 3), "old_TBps": round(kv_bytes / t_old / 1e6, 3)}
    print(json.dumps(r), flush=True); out.append(r)
json.dump({"device": torch.cuda.get_device_name(), "results": out}, open(sys.argv[1], "w"), indent=1)
