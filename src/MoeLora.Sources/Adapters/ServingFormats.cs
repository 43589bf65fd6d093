using System.Text.Json;
using System.Text.Json.Nodes;
using MoeLora.Core;

namespace MoeLora.Sources.Adapters;

/// <summary>
/// What vLLM reads of a PEFT adapter, from vLLM's own loader (vllm-project/vllm):
/// <list type="bullet">
/// <item><c>vllm/lora/peft_helper.py</c> <c>PEFTHelper</c>: reads one <c>r</c> and one <c>lora_alpha</c> (every LoRA
/// gets scaling lora_alpha/r; <c>rank_pattern</c>/<c>alpha_pattern</c> are not read), refuses a non-empty
/// <c>modules_to_save</c> and <c>use_dora</c>; <c>validate_legal</c> refuses <c>r</c> above <c>--max-lora-rank</c>.</item>
/// <item><c>vllm/lora/utils.py</c> <c>parse_fine_tuned_lora_name</c>: only <c>lora_A/lora_B.weight</c> and
/// <c>lora_embedding_A/B</c> keys are LoRA weights, any other key raises; <c>is_base_embedding_weights</c> skips
/// <c>*.embed_tokens.base_layer.weight</c> and <c>*.lm_head.base_layer.weight</c> without a word.</item>
/// <item><c>vllm/lora/lora_model.py</c> <c>LoRAModel.from_local_checkpoint</c>: per-expert keys must end in an
/// <c>experts.{e}.{proj}</c> the model class expects (its checkpoint's expert names); <c>…experts.base_layer</c> keys
/// (PEFT's fused gate_up) are exempt from that check.</item>
/// <item><c>vllm/lora/lora_weights.py</c> <c>PackedLoRALayerWeights.pack_moe</c>: asserts a gate, down and up LoRA
/// for every expert.</item>
/// <item><c>vllm/lora/model_manager.py</c>: model classes with <c>is_3d_moe_weight</c> (e.g. <c>GptOssForCausalLM</c>
/// in <c>vllm/model_executor/models/gpt_oss.py</c>) read PEFT's fused layout in <c>_stack_moe_lora_weights</c>; the
/// others read the per-expert one, unless the server runs with <c>--enable-mixed-moe-lora-format</c> and the LoRA
/// request says <c>is_3d_lora_weight</c> (<c>_convert_3d_to_2d_moe_lora</c>, which splits gpt-oss' interleaved
/// gate/up). <c>is_3d_lora_weight</c> is a field of the LoRA request (<c>--lora-modules</c> JSON), not of
/// adapter_config.json.</item>
/// </list>
/// </summary>
public static class VllmFormat
{
    /// <summary>
    /// The adapter as vLLM reads it: the per-expert form under the checkpoint's expert names for models whose
    /// checkpoints store experts per expert, PEFT's fused form for models whose checkpoints store them fused (vLLM's
    /// classes for those declare <c>is_3d_moe_weight</c>); one <c>r</c> and <c>lora_alpha</c> in both.
    /// </summary>
    public static AdapterFolder Write(AdapterFolder input, ExpertLayout layout)
    {
        RefuseWhatVllmRefuses(input);
        var (pairs, _) = LoraPairs.Read(input);
        bool fusedOnDisk = pairs.Any(p => p.Parameter is not null && p.Experts > 1 && layout.IsStoredFused(p.Module))
            || pairs.Any(p => p.Parameter is null && layout.Locate(p.Module) is { } w && layout.IsStoredFused(w.Owner));
        if (!fusedOnDisk)
            return AdapterConvert.ToPerExpert(input, layout, oneRankFor: "--to vllm");
        // vLLM's fused MoE LoRA reads A as (E·r, hidden) for gate_up (_stack_moe_lora_weights); PEFT 0.21 saves Llama 4's
        // transposed (A reads the 2·intermediate features), and how vLLM's Llama 4 class takes it is not established.
        if (pairs.FirstOrDefault(p => p.Parameter is not null && p.Experts > 1 && layout.PeftDeltaTransposed(p.Module)) is { } t)
            throw new UserInputException($"--to vllm: PEFT stores {t.Module}'s expert LoRA transposed (this model's experts are (E, in, out) without is_transposed), unlike the fused layout vLLM's loader reshapes; not converted.");

        var fused = pairs.Any(p => p.Parameter is null && layout.Locate(p.Module) is not null) ? AdapterConvert.ToFused(input, layout) : input;
        var (fusedPairs, other) = LoraPairs.Read(fused);
        var config = (JsonObject)fused.Config.DeepClone();
        var padded = AdapterConvert.PadToOneRank(
            fusedPairs.Select(p => (p.Module + string.Concat(Enumerable.Repeat(".base_layer", p.Depth)), p.A, p.B, p.Rank, p.Alpha)).ToList(),
            LoraPairs.Bool(config, "use_rslora"), config, "--to vllm");
        var tensors = other.ToList();
        foreach (var (m, a, b, _, _) in padded)
        {
            tensors.Add(a with { Name = $"{LoraPairs.Prefix}{m}.lora_A.weight" });
            tensors.Add(b with { Name = $"{LoraPairs.Prefix}{m}.lora_B.weight" });
        }
        return new AdapterFolder(config, tensors.OrderBy(t => t.Name, StringComparer.Ordinal).ToList());
    }

    private static void RefuseWhatVllmRefuses(AdapterFolder input)
    {
        var cfg = input.Config;
        if (LoraPairs.StringList(cfg, "modules_to_save").Count > 0)
            throw new UserInputException("--to vllm: the adapter has modules_to_save, which vLLM refuses (PEFTHelper: \"vLLM only supports modules_to_save being None\"); merge it instead.");
        if (LoraPairs.Bool(cfg, "use_dora"))
            throw new UserInputException("--to vllm: DoRA adapters are refused by vLLM (PEFTHelper: \"vLLM does not yet support DoRA\").");
        if (cfg["bias"] is JsonValue bias && bias.GetValueKind() == JsonValueKind.String && bias.GetValue<string>() != "none")
            throw new UserInputException($"--to vllm: bias='{bias.GetValue<string>()}' adapters need vLLM's bias support; not converted.");
        var (_, other) = LoraPairs.Read(input);
        if (other.Count > 0)
            throw new UserInputException($"--to vllm: {other[0].Name} is not a LoRA weight; vLLM refuses such keys (parse_fine_tuned_lora_name){(other.Count > 1 ? $", and {other.Count - 1} more" : "")}.");
    }

    /// <summary>The traps of <paramref name="folder"/> for vLLM; <paramref name="layout"/> null when the model is unknown.</summary>
    public static IEnumerable<string> Traps(AdapterFolder folder, IReadOnlyList<LoraPair> pairs, IReadOnlyList<AdapterTensor> other, ExpertLayout? layout)
    {
        var cfg = folder.Config;
        if (LoraPairs.StringList(cfg, "modules_to_save").Count > 0)
            yield return "vLLM refuses this adapter: modules_to_save is set (PEFTHelper allows only None).";
        if (LoraPairs.Bool(cfg, "use_dora"))
            yield return "vLLM refuses this adapter: use_dora (PEFTHelper).";
        // One scaling lora_alpha/r for all (PEFTHelper ignores rank_pattern/alpha_pattern); ranks may differ when the
        // scaling is the same (PEFT's doubled gate_up rank and alpha), since the factors' shapes carry the rank.
        bool rslora = LoraPairs.Bool(cfg, "use_rslora");
        if (pairs.Select(p => p.Scaling(rslora)).Distinct().Count() > 1)
            yield return "vLLM would mis-scale: it reads one r and lora_alpha (PEFTHelper ignores rank_pattern/alpha_pattern), so LoRAs with another alpha/r get scaling lora_alpha/r; `moelora adapter convert --to vllm` refuses such adapters too, as no padding keeps their ΔW.";
        foreach (var k in other)
        {
            if (k.Name.EndsWith(".embed_tokens.base_layer.weight", StringComparison.Ordinal) || k.Name.EndsWith(".lm_head.base_layer.weight", StringComparison.Ordinal))
                yield return $"vLLM would drop {k.Name} silently (is_base_embedding_weights).";
            else
                yield return $"vLLM refuses {k.Name}: not a lora_A/lora_B weight (parse_fine_tuned_lora_name raises).";
        }

        var perExpert = pairs.Where(p => p.Parameter is null)
            .Select(p => (Pair: p, Where: layout?.Locate(p.Module) ?? GenericLocate(p.Module)))
            .Where(x => x.Where is not null && x.Pair.Location == "routed").ToList();
        foreach (var owner in perExpert.GroupBy(x => x.Where!.Value.Owner))
        {
            int count = owner.Max(x => x.Where!.Value.Expert) + 1;
            var present = owner.Select(x => (x.Where!.Value.Expert, x.Where!.Value.Role)).ToHashSet();
            if (present.Count != 3 * count)
                yield return $"vLLM refuses {owner.Key}: its per-expert MoE LoRA needs the gate, up and down LoRA of every expert ({present.Count} of {3 * count} present; PackedLoRALayerWeights.pack_moe asserts).";
            if (layout is not null && layout.IsStoredFused(owner.Key))
                yield return $"vLLM refuses the per-expert keys of {owner.Key}: its class for this model reads only PEFT's fused expert layout (is_3d_moe_weight); `moelora adapter convert --to vllm` writes that.";
        }
        var fusedOwners = pairs.Where(p => p.Parameter is not null && p.Experts > 1).Select(p => p.Module).Distinct().ToList();
        if (fusedOwners.Count > 0 && (layout is null || fusedOwners.Any(o => !layout.IsStoredFused(o))))
            yield return "vLLM reads this fused 3-D expert layout only on model classes that declare is_3d_moe_weight, or with --enable-mixed-moe-lora-format and is_3d_lora_weight in the LoRA request; `moelora adapter convert --to vllm` writes the per-expert form its other classes read.";
    }

    private static (string Owner, int Expert, ExpertRole Role)? GenericLocate(string module) => ExpertLayout.Generic(GateUpOrder.Halves).Locate(module);
}

/// <summary>
/// What SGLang reads, from its loader (sgl-project/sglang): <c>python/sglang/srt/lora/lora_config.py</c>
/// <c>LoRAConfig</c> takes one <c>r</c> and <c>lora_alpha</c> (<c>lora.py</c> <c>LoRAAdapter</c>: scaling =
/// lora_alpha / r for every module); <c>lora.py</c> <c>_rename_expert_w_to_proj</c> and
/// <c>normalize_gate_up_proj</c> read per-expert keys (<c>…experts.{e}.gate_proj/up_proj/down_proj</c>, Mixtral's
/// <c>w1/w3/w2</c> renamed) and stack gate then up per expert into its <c>gate_up_proj_moe</c> buffer. PEFT's fused
/// ParamWrapper keys are not among them.
/// </summary>
public static class SglangFormat
{
    public static AdapterFolder Write(AdapterFolder input, ExpertLayout layout)
    {
        var (pairs, other) = LoraPairs.Read(input);
        if (other.Count > 0)
            throw new UserInputException($"--to sglang: {other[0].Name} is not a LoRA weight; not converted.");
        var owners = pairs.Where(p => p.Parameter is not null && p.Experts > 1).Select(p => p.Module)
            .Concat(pairs.Where(p => p.Parameter is null).Select(p => layout.Locate(p.Module)?.Owner).OfType<string>());
        // SGLang stacks gate before up; for models that keep experts fused on disk (gpt-oss interleaves them) its
        // per-expert names and order are not established by its source, so nothing is guessed.
        if (owners.FirstOrDefault(layout.IsStoredFused) is { } fused)
            throw new UserInputException($"--to sglang: {fused} is stored fused in this model's checkpoint; SGLang's per-expert LoRA names for such models are not established, so it is not converted.");
        return AdapterConvert.ToPerExpert(input, layout, oneRankFor: "--to sglang");
    }
}
