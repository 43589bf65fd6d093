using MoeLora.Core.Peft;
using MoeLora.Torch.Models;
using MoeLora.Torch.Nn;
using TorchSharp;
using static TorchSharp.torch;
using CoreLayout = MoeLora.Core.Modules.Layout;

namespace MoeLora.Torch.Lora;

public static partial class LoraInjector
{
    /// <summary>
    /// Core's plan for a model <c>config.json</c> and a LoraConfig / adapter_config.json (transformers-5 layout):
    /// PEFT's matching, the v5 rewrite of gate/up/down targets and the effective config, in one place.
    /// </summary>
    public static AdapterPlan Plan(string modelConfigJson, string loraConfigJson, string source = "LoRA config")
    {
        var spec = MoeLora.Core.Architectures.ArchitectureRegistry.Build(
            MoeLora.Core.Config.ModelConfig.Parse(modelConfigJson, "config.json"), CoreLayout.V5);
        return AdapterPlanner.Plan(spec, MoeLora.Core.Peft.LoraConfig.FromJson(loraConfigJson, source));
    }

    /// <summary>Core's plan for <paramref name="model"/> (its config.json, truncation included) and a LoraConfig JSON.</summary>
    public static AdapterPlan Plan(CausalLm model, string loraConfigJson, string source = "LoRA config") =>
        AdapterPlanner.Plan(model.Spec, MoeLora.Core.Peft.LoraConfig.FromJson(loraConfigJson, source));

    /// <summary>
    /// Injects exactly the adapters of Core's <see cref="AdapterPlan"/> (the single source of matching): each
    /// <see cref="AdapterTarget"/> names the module, the parameter, r, scaling and the wrapper path, and the plan's
    /// <c>TrainableTensors</c> are checked against the injected model's trainable tensors (names, shapes, order)
    /// before returning. Linear (+ DoRA), fused 3-D expert parameters and 2-D router weights are supported;
    /// Embedding adapters, lora_bias and trainable extras (bias modes, modules_to_save) are rejected.
    /// </summary>
    /// <param name="baseModelNameOrPath">written as <c>base_model_name_or_path</c> when the adapter is saved.</param>
    public static InjectedAdapter Inject(CausalLm model, AdapterPlan plan, string adapterName = "default", long seed = 0, string? baseModelNameOrPath = null)
    {
        if (plan.Spec.Layout != CoreLayout.V5)
            throw new NotSupportedException("the runtime builds transformers-5 modules (fused experts); plan with --layout v5.");
        var eff = plan.Effective;
        if (eff.LoraBias) throw new NotSupportedException("lora_bias=true is not supported by MoeLora.Torch.");
        if (eff.FanInFanOut) throw new NotSupportedException("fan_in_fan_out=true is not supported by MoeLora.Torch.");
        if (plan.Extras.Count > 0)
            throw new NotSupportedException($"trainable base tensors besides LoRA ({string.Join(", ", plan.Extras.Select(e => e.Reason).Distinct())}) are not supported by MoeLora.Torch; use bias=none and no modules_to_save.");
        if (plan.Targets.FirstOrDefault(t => t.Kind == AdapterKind.Embedding) is { } emb)
            throw new NotSupportedException($"LoRA on the embedding {emb.ModuleName} is not supported by MoeLora.Torch (Linear, DoRA-Linear and ParamWrapper only).");
        var gen = new Generator((ulong)seed);

        var modules = model.NamedModules().ToDictionary(m => m.Name, m => m.Module, StringComparer.Ordinal);
        var parents = new Dictionary<HfModule, (HfModule Parent, string Child)>(ReferenceEqualityComparer.Instance);
        foreach (var (_, m) in modules) foreach (var (n, c) in m.Children) parents[c] = (m, n);
        HfModule Module(string name) => modules.TryGetValue(name, out var m) ? m
            : throw new InvalidOperationException($"the plan targets {name}, which the runtime model does not have.");

        var wrappers = new List<(string, LoraWrapper)>();
        // Innermost wrappers first: a module with several target parameters nests them (more .base_layer = inner).
        var ordered = plan.Targets.Select((t, i) => (t, i))
            .OrderBy(x => x.t.Kind == AdapterKind.Parameter ? 1 : 0)
            .ThenBy(x => x.t.Kind == AdapterKind.Parameter ? x.t.ModuleName : "", StringComparer.Ordinal)
            .ThenByDescending(x => Depth(x.t.WrapperPath, x.t.ModuleName))
            .ThenBy(x => x.i).Select(x => x.t).ToList();
        var current = new Dictionary<string, HfModule>(StringComparer.Ordinal);
        foreach (var t in ordered)
        {
            if (t.Kind == AdapterKind.Linear)
            {
                // The one table of modules PEFT's lora.Linear breaks (Core's peft_forward_fails warning reads it too).
                if (plan.Spec.Tree.Find(t.ModuleName) is { } node && PeftModelTables.LoraForwardFails(node.ClassName) is { } why)
                    throw new MoeLora.Core.UserInputException($"{t.ModuleName}: LoRA cannot wrap {node.ClassName}, {why} " +
                        $"(PEFT {plan.Version} fails on it too); leave it out of target_modules.");
                if (Module(t.ModuleName) is not Linear linear)
                    throw new InvalidOperationException($"plan target {t.ModuleName} is a Linear but the runtime module is {Module(t.ModuleName).GetType().Name}.");
                if (linear.InFeatures != t.InFeatures || linear.OutFeatures != t.OutFeatures)
                    throw new InvalidOperationException($"plan target {t.ModuleName}: plan [{t.OutFeatures},{t.InFeatures}] vs runtime [{linear.OutFeatures},{linear.InFeatures}].");
                var (a, b) = InitFactors(eff.InitLoraWeights, t.R, t.R, t.InFeatures, t.OutFeatures, linear.weight.device, gen);
                LoraWrapper w = t.Dora
                    ? new DoraLinear(linear, adapterName, a, b, t.Scaling, t.R, eff.LoraDropout)
                    : new LoraLinear(linear, adapterName, a, b, t.Scaling, t.R, eff.LoraDropout);
                var (parent, child) = parents[linear];
                parent.ReplaceChild(child, w);
                wrappers.Add((t.ModuleName, w));
                continue;
            }
            var owner = Module(t.ModuleName);
            var inner = current.GetValueOrDefault(t.ModuleName) ?? owner;
            var pname = t.ParameterName!;
            var p = owner.DirectParameters.FirstOrDefault(kv => kv.Key == pname).Value
                ?? throw new InvalidOperationException($"plan target {t.Name}: the runtime module has no parameter '{pname}'.");
            if (!p.shape.SequenceEqual(t.BaseShape))
                throw new InvalidOperationException($"plan target {t.Name}: plan shape [{string.Join(",", t.BaseShape)}] vs runtime [{string.Join(",", p.shape)}].");
            var (pa, pb) = InitFactors(eff.InitLoraWeights, t.R, (int)(t.R * t.NumExperts), t.InFeatures, t.OutFeatures, p.device, gen);
            LoraWrapper pw = p.dim() switch
            {
                3 when owner is ExpertsBase experts => new ParamLora(inner, experts, pname, adapterName, pa, pb, t.Scaling, t.R),
                2 => new ParamLora2D(inner, owner, pname, adapterName, pa, pb, t.Scaling, t.R),
                _ => throw new NotSupportedException($"target_parameters on {t.Name} ({owner.GetType().Name}, {p.dim()}-D) is not supported by MoeLora.Torch."),
            };
            var (pp, pc) = parents[inner];
            pp.ReplaceChild(pc, pw);
            parents[pw] = (pp, pc);
            current[t.ModuleName] = pw;
            wrappers.Add((t.ModuleName, pw));
        }
        if (wrappers.Count == 0) throw new InvalidOperationException("the adapter plan has no targets.");
        CheckAgainstPlan(model, plan);
        return new InjectedAdapter(adapterName, plan, eff.ToAdapterConfigJson(baseModelNameOrPath), wrappers);
    }

    static int Depth(string wrapperPath, string module) =>
        (wrapperPath.Length - module.Length) / ".base_layer".Length;

    /// <summary>The injected model's trainable tensors must be the plan's: same PEFT names, shapes and order.</summary>
    public static void CheckAgainstPlan(CausalLm model, AdapterPlan plan)
    {
        var actual = PeftNamedParameters(model).Select(p => (p.Name, Shape: p.Param.shape)).ToList();
        var expected = plan.TrainableTensors;
        for (int i = 0; i < Math.Max(actual.Count, expected.Count); i++)
        {
            var a = i < actual.Count ? $"{actual[i].Name} [{string.Join(",", actual[i].Shape)}]" : "(none)";
            var e = i < expected.Count ? $"{expected[i].RuntimeName} [{string.Join(",", expected[i].Shape)}]" : "(none)";
            if (a != e) throw new InvalidOperationException($"injected adapter differs from the plan at trainable tensor {i}: runtime {a}, plan {e}.");
        }
    }
}
