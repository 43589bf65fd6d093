using MoeLora.Core.Architectures;
using MoeLora.Core.Config;
using MoeLora.Sources.Adapters;
using MoeLora.Sources.Safetensors;
using MoeLora.Torch.Lora;
using MoeLora.Torch.Models;
using Xunit.Abstractions;
using static TorchSharp.torch;

namespace MoeLora.Torch.Tests;

/// <summary>
/// A per-expert adapter whose gate and up LoRAs have their own A (as PEFT &lt;= 0.18 trained them), converted to
/// PEFT's fused format (A stacked, B block-diagonal, rank and alpha doubled), loads in the runtime and gives the
/// outputs of the PEFT 0.21 adapter it was made from: up's A is doubled and its B halved, which keeps every ΔW exact,
/// so any misplaced row or column would show. A round trip alone cannot catch a split that is wrong both ways, so a
/// second check adapts only the gate projections: the per-expert up LoRAs are zeroed before fusing, and the result must
/// equal the PEFT adapter with its up features zeroed where transformers keeps them (gpt-oss: odd gate_up features;
/// Llama 4: the second half of the columns its lora_A reads; the others: the second half of lora_B's rows).
/// </summary>
public class ConvertedAdapterLoadTests(ITestOutputHelper log)
{
    public static TheoryData<string> Models() => new() { "mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3", "llama4_text", "gpt_oss" };

    [Theory]
    [MemberData(nameof(Models))]
    public void BlockDiagonalFusedAdapterGivesTheOriginalOutputs(string type)
    {
        string modelDir = Path.Combine(Fixtures.Dir(type), "model");
        string configPath = Path.Combine(modelDir, "config.json");
        var spec = ArchitectureRegistry.Build(ModelConfig.Parse(File.ReadAllText(configPath), configPath), Core.Modules.Layout.V5);
        var layout = ExpertLayout.FromSpec(spec, type);
        var original = AdapterFolder.Read(Path.Combine(Fixtures.Dir(type), "attn_plus_experts"));

        var perExpert = AdapterConvert.Convert(original, "per-expert", layout);
        var ownUp = new AdapterFolder(perExpert.Config, perExpert.Tensors.Select(t =>
            layout.Locate(ModuleOf(t.Name)) is { Role: ExpertRole.Up } ? t with { Data = Scale(t, t.Name.Contains(".lora_A.") ? 2f : 0.5f) } : t).ToList());
        var fused = AdapterConvert.Convert(ownUp, "peft-v5", layout);
        var gateUp = LoraPairs.Read(fused).Pairs.First(p => p.Parameter == "gate_up_proj");
        Assert.Equal(2 * LoraPairs.Read(original).Pairs.First(p => p.Parameter == "gate_up_proj").Rank, gateUp.Rank);

        var gateOnly = AdapterConvert.Convert(new AdapterFolder(perExpert.Config, perExpert.Tensors.Select(t =>
            layout.Locate(ModuleOf(t.Name)) is { Role: ExpertRole.Up } && t.Name.Contains(".lora_B.") ? t with { Data = new byte[t.Data.Length] } : t).ToList()),
            "peft-v5", layout);
        var originalGateOnly = new AdapterFolder(original.Config, original.Tensors.Select(t => ZeroUpFeatures(t, original, type)).ToList());

        string root = Path.Combine(Path.GetTempPath(), $"moelora-blockdiag-{Guid.NewGuid():N}");
        string dir = Path.Combine(root, "block-diagonal"), gateDir = Path.Combine(root, "gate-only"), refGateDir = Path.Combine(root, "reference-gate-only");
        try
        {
            fused.Write(dir);
            gateOnly.Write(gateDir);
            originalGateOnly.Write(refGateDir);
            var inputs = Fixtures.Reference(type);
            var mask = inputs["attention_mask"];
            Tensor Logits(string adapterDir)
            {
                using var holder = new DisposableModel(TorchModelFactory.Load(modelDir));
                LoraInjector.LoadPeftAdapter(holder.Model, adapterDir);
                holder.Model.Eval();
                using var _ = no_grad();
                using var output = holder.Model.Forward(inputs["input_ids"], mask);
                return output.Logits.detach().clone();
            }
            using var converted = Logits(dir);
            using var reference = Logits(Path.Combine(Fixtures.Dir(type), "attn_plus_experts"));
            double err = Fixtures.MaskedRelError(converted, reference, mask);
            log.WriteLine($"{type}: block-diagonal fused vs original, max rel logits error {err:E2}");
            Assert.True(err < 1e-5, $"{type}: {err:E2}");

            using var gate = Logits(gateDir);
            using var refGate = Logits(refGateDir);
            double gateErr = Fixtures.MaskedRelError(gate, refGate, mask);
            double moved = Fixtures.MaskedRelError(refGate, reference, mask);
            log.WriteLine($"{type}: gate-only per-expert vs PEFT with up features zeroed {gateErr:E2} (zeroing up moved the logits by {moved:E2})");
            Assert.True(moved > 1e-4, $"{type}: zeroing the up features changed nothing ({moved:E2}); the check would prove nothing");
            Assert.True(gateErr < 1e-5, $"{type}: gate-only {gateErr:E2}");
        }
        finally { if (Directory.Exists(root)) Directory.Delete(root, true); }
    }

    // The original PEFT file with gate_up's up features zeroed, from transformers' own use of gate_up_proj (5.17):
    // gpt-oss gate = [..., ::2], up = [..., 1::2] of (E, H, 2I), is_transposed, so PEFT's lora_B rows are features;
    // Llama 4 x @ (E, H, 2I) chunked in halves without is_transposed, so PEFT's lora_A columns are the features;
    // the others (E, 2I, H) = cat(gate, up) rows, PEFT's lora_B rows.
    private static AdapterTensor ZeroUpFeatures(AdapterTensor t, AdapterFolder folder, string type)
    {
        var gateUp = LoraPairs.Read(folder).Pairs.Where(p => p.Parameter == "gate_up_proj").ToList();
        bool isA = gateUp.Any(p => p.A.Name == t.Name), isB = gateUp.Any(p => p.B.Name == t.Name);
        if (type == "llama4_text" ? !isA : !isB) return t;
        var data = (byte[])t.Data.Clone();
        long rows = t.Shape[0], cols = t.Shape[1];
        for (long i = 0; i < rows; i++)
            for (long j = 0; j < cols; j++)
            {
                bool up = type switch
                {
                    "gpt_oss" => i % 2 == 1,
                    "llama4_text" => j >= cols / 2,
                    _ => i >= rows / 2,
                };
                if (up) Array.Clear(data, (int)((i * cols + j) * 4), 4);
            }
        return t with { Data = data };
    }

    private static string ModuleOf(string key) =>
        key[LoraPairs.Prefix.Length..key.LastIndexOf(".lora_", StringComparison.Ordinal)];

    private static byte[] Scale(AdapterTensor t, float factor)
    {
        Assert.Equal(SafetensorsDtype.F32, t.Dtype);
        var data = (byte[])t.Data.Clone();
        for (int i = 0; i < data.Length; i += 4)
            BitConverter.TryWriteBytes(data.AsSpan(i, 4), BitConverter.ToSingle(data, i) * factor);
        return data;
    }
}
