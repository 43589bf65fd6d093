using System.Diagnostics;
using System.Text.Json.Nodes;
using MoeLora.Torch.Lora;
using MoeLora.Torch.Models;
using MoeLora.Torch.Runtime;
using TorchSharp;
using static TorchSharp.torch;

// MoE LoRA throughput on this machine: a plain matmul's FLOP/s as the yardstick, one MoE expert layer with fused
// LoRA (per-expert loop as the runtime dispatches vs grouped dispatch with one batched matmul), and a whole small
// model (forward, forward+backward with ParamWrapper LoRA on the experts). Not part of the test run.
TorchRuntime.EnsureInitialized();
int threads = args.Length > 0 ? int.Parse(args[0]) : Environment.ProcessorCount;
torch.set_num_threads(threads);
manual_seed(0);

double matmulFlops = 0;
double Time(Action a, int reps)
{
    a(); // warm-up
    var sw = Stopwatch.StartNew();
    for (int i = 0; i < reps; i++) a();
    return sw.Elapsed.TotalSeconds / reps;
}

Console.WriteLine($"threads {threads}; {DateTime.UtcNow:yyyy-MM-dd HH:mm} UTC; load average {File.ReadAllText("/proc/loadavg").Trim()}; " +
    (File.Exists("/proc/cpuinfo") ? File.ReadLines("/proc/cpuinfo").FirstOrDefault(l => l.StartsWith("model name"))?.Split(':', 2)[1].Trim() : ""));
// 1. Plain matmul yardstick. The reference is a square [2048x2048]x[2048x2048] (17 GFLOP, large enough for the
// BLAS kernel to reach its peak); the MoE layer's own [1024x512]x[512x1024] is shown for comparison.
const long T = 512, H = 512, I = 1024, E = 8, K = 2, R = 16;
using (var a = randn(2048, 2048)) using (var b = randn(2048, 2048))
{
    double s = Time(() => { using var c = matmul(a, b); }, 5);
    Report("matmul [2048x2048]x[2048x2048] (yardstick)", 2.0 * 2048 * 2048 * 2048, s, null);
}
using (var a = randn(T * K, H)) using (var b = randn(H, I))
{
    double s = Time(() => { using var c = matmul(a, b); }, 20);
    Report("matmul [1024x512]x[512x1024]", 2.0 * T * K * H * I, s, null);
}

// 2. One MoE expert layer: x [T,H], top-2 of E, SwiGLU experts gate_up [E,2I,H], down [E,H,I], LoRA A/B per expert.
var x = randn(T, H).requires_grad_(); // as inside a model: the layer's input gradient is computed too
var gateUp = randn(E, 2 * I, H) * 0.02; var down = randn(E, H, I) * 0.02;
var aGu = (randn(R * E, H) * 0.02).requires_grad_(); var bGu = (randn(2 * I, R * E) * 0.02).requires_grad_();
var aD = (randn(R * E, I) * 0.02).requires_grad_(); var bD = (randn(H, R * E) * 0.02).requires_grad_();
var topIdx = randint(0, E, [T, K]);
var topW = softmax(randn(T, K), -1);
// Expert-layer FLOPs: per routed token 2·H·2I + 2·I·H (base) plus LoRA x·A, ·B for both tensors.
double layerFlops = T * K * (2.0 * H * 2 * I + 2.0 * I * H + 2.0 * R * (H + 2 * I) + 2.0 * R * (I + H));

Tensor Delta(Tensor A, Tensor B, long outF) => einsum("ore,eri->eoi", B.reshape(outF, R, E), A.reshape(E, R, -1));

// (a) the runtime's path: materialise W+ΔW, loop over experts.
Tensor Loop(bool grad)
{
    var gu = gateUp + Delta(aGu, bGu, 2 * I); var dn = down + Delta(aD, bD, H);
    var final = zeros_like(x);
    var counts = topIdx.flatten().bincount(null, E).data<long>().ToArray();
    for (long e = 0; e < E; e++)
    {
        if (counts[e] == 0) continue;
        var where = topIdx.eq(e).nonzero(); var tok = where[.., 0]; var slot = where[.., 1];
        var cur = x.index_select(0, tok);
        var h2 = nn.functional.linear(cur, gu[e]).chunk(2, -1);
        var y = nn.functional.linear(nn.functional.silu(h2[0]) * h2[1], dn[e]);
        final = final.index_add(0, tok, y * topW.index(TensorIndex.Tensor(tok), TensorIndex.Tensor(slot)).unsqueeze(-1), 1.0);
    }
    return final;
}
// (b) grouped dispatch: sort (token, slot) pairs by expert, pad each expert's group to the largest, one bmm for the
// base weights and LoRA applied as low-rank products (no W+ΔW materialisation).
Tensor Grouped(bool grad)
{
    var flatE = topIdx.flatten(); var order = flatE.argsort(); var tokOf = order.div(K, rounding_mode: RoundingMode.floor);
    var counts = flatE.bincount(null, E); long cap = counts.max().item<long>();
    var starts = counts.cumsum(0) - counts;
    var sortedE = flatE.index_select(0, order);
    var pos = arange(T * K) - starts.index_select(0, sortedE);
    var slotIdx = sortedE * cap + pos;                                   // row in the padded [E*cap] buffer
    var xin = zeros(E * cap, H).index_copy(0, slotIdx, x.index_select(0, tokOf)).view(E, cap, H);
    var aG = aGu.view(E, R, H); var bG = bGu.view(2 * I, R, E).permute(2, 0, 1);   // (E, 2I, R)
    var gu = bmm(xin, gateUp.transpose(1, 2)) + bmm(bmm(xin, aG.transpose(1, 2)), bG.transpose(1, 2)) * 1.0;
    var h2 = gu.chunk(2, -1); var act = nn.functional.silu(h2[0]) * h2[1];           // (E, cap, I)
    var aDd = aD.view(E, R, I); var bDd = bD.view(H, R, E).permute(2, 0, 1);
    var y = bmm(act, down.transpose(1, 2)) + bmm(bmm(act, aDd.transpose(1, 2)), bDd.transpose(1, 2));
    var rows = y.view(E * cap, H).index_select(0, slotIdx);
    var w = topW.flatten().index_select(0, order).unsqueeze(-1);
    return zeros_like(x).index_add(0, tokOf, rows * w, 1.0);
}
bool modelOnly = args.Length > 1 && args[1] == "model";
if (!modelOnly)
using (no_grad())
{
    var diff = (Loop(false) - Grouped(false)).abs().max().item<float>();
    Console.WriteLine($"grouped vs loop max |diff| {diff:g3}");
}
foreach (var (name, f) in modelOnly ? [] : new (string, Func<bool, Tensor>)[] { ("per-expert loop (W+ΔW)", Loop), ("grouped dispatch (bmm, low-rank LoRA)", Grouped) })
{
    double fw;
    using (no_grad()) fw = Time(() => { using var s = NewDisposeScope(); f(false); }, 5);
    double fb = Time(() =>
    {
        using var s = NewDisposeScope();
        f(true).square().mean().backward();
        foreach (var p in new[] { aGu, bGu, aD, bD, x }) p.grad = null;
    }, 5);
    Report($"MoE layer fwd, {name}", layerFlops, fw, T);
    Report($"MoE layer fwd+bwd, {name}", 2 * layerFlops, fb, T); // frozen base: backward = input grads (≈ fwd) + small LoRA grads
}

// 3. Whole small model: Mixtral-shaped, random weights, LoRA on attention + fused experts (ParamWrapper).
var config = new JsonObject
{
    ["model_type"] = "mixtral", ["hidden_size"] = 512, ["intermediate_size"] = 1024, ["num_hidden_layers"] = 4,
    ["num_attention_heads"] = 8, ["num_key_value_heads"] = 4, ["vocab_size"] = 8192, ["num_local_experts"] = 8,
    ["num_experts_per_tok"] = 2, ["rms_norm_eps"] = 1e-5, ["rope_theta"] = 1e6, ["max_position_embeddings"] = 4096,
    ["hidden_act"] = "silu", ["initializer_range"] = 0.02, ["tie_word_embeddings"] = false,
}.ToJsonString();
using var model = TorchModelFactory.Random(config, 0, ScalarType.Float32);
// init_lora_weights=false: non-zero B, as after some training (the cost does not depend on the values).
LoraInjector.Inject(model, LoraInjector.Plan(model, """{"r":16,"lora_alpha":32,"init_lora_weights":false,"target_modules":["q_proj","k_proj","v_proj","o_proj"],"target_parameters":["mlp.experts.gate_up_proj","mlp.experts.down_proj"]}"""));
var counts = Measurements.CountParameters(model);
long seq = 256;
var ids = randint(0, 8192, [2, seq]);
// Dense FLOPs per token ≈ 2 × (active parameters): attention + lm_head + top-2 of 8 experts; forward+backward ≈ 2× (base weights frozen, no weight gradients).
double active = 4 * (4.0 * 512 * 512 * 0.75 + 2 * 3.0 * 512 * 1024) + 512.0 * 8192;
double tokens = 2 * seq;
// The runtime's two expert paths: ExpertDispatch.Loop (per-expert loop over W+ΔW, the previous runtime) and
// ExpertDispatch.Grouped (the default: sorted by expert, one bmm per weight, LoRA as low-rank products).
foreach (var dispatch in new[] { MoeLora.Torch.Nn.ExpertDispatch.Loop, MoeLora.Torch.Nn.ExpertDispatch.Grouped })
{
    model.SetExpertDispatch(dispatch);
    double mf;
    using (no_grad()) mf = Time(() => { using var s = NewDisposeScope(); model.Forward(ids).Dispose(); }, 3);
    Report($"model fwd (mixtral-small, {counts.Total / 1e6:0.0}M params), runtime {dispatch}", 2 * active * tokens, mf, (long)tokens);
    double mb = Time(() =>
    {
        using var s = NewDisposeScope();
        using var o = model.Forward(ids);
        o.Logits.square().mean().backward();
        foreach (var (_, p) in model.NamedParameters()) if (p.requires_grad) p.grad = null;
    }, 3);
    Report($"model fwd+bwd (LoRA training step), runtime {dispatch}", 4 * active * tokens, mb, (long)tokens); // frozen base: ≈ 2× fwd
}

// 4. The same model made dense (llama, intermediate = top-2 × 1024: equal active parameters), LoRA on all seven
// projections: what the non-expert parts (attention, norms, lm_head, LoRA on Linear) cost at this size.
var dense = System.Text.Json.Nodes.JsonNode.Parse(config)!.AsObject();
dense["model_type"] = "llama"; dense["intermediate_size"] = 2048; dense.Remove("num_local_experts"); dense.Remove("num_experts_per_tok");
using var denseModel = TorchModelFactory.Random(dense.ToJsonString(), 0, ScalarType.Float32);
LoraInjector.Inject(denseModel, LoraInjector.Plan(denseModel, """{"r":16,"lora_alpha":32,"init_lora_weights":false,"target_modules":["q_proj","k_proj","v_proj","o_proj","gate_proj","up_proj","down_proj"]}"""));
double df;
using (no_grad()) df = Time(() => { using var s = NewDisposeScope(); denseModel.Forward(ids).Dispose(); }, 3);
Report("dense llama, same active parameters: fwd", 2 * active * tokens, df, (long)tokens);
double db = Time(() =>
{
    using var s = NewDisposeScope();
    using var o = denseModel.Forward(ids);
    o.Logits.square().mean().backward();
    foreach (var (_, p) in denseModel.NamedParameters()) if (p.requires_grad) p.grad = null;
}, 3);
Report("dense llama, same active parameters: fwd+bwd (LoRA training step)", 4 * active * tokens, db, (long)tokens);

void Report(string name, double flops, double seconds, long? toks)
{
    double fps = flops / seconds;
    if (matmulFlops == 0) matmulFlops = fps;
    Console.WriteLine($"| {name} | {seconds * 1000:0.0} ms | {(toks is null ? "" : $"{toks / seconds:0} tok/s")} | {fps / 1e9:0.0} GFLOP/s | {fps / matmulFlops:0.00} |");
}
Console.WriteLine($"load average after: {File.ReadAllText("/proc/loadavg").Trim()}");
