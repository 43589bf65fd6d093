using MoeLora.Core.Architectures;
using MoeLora.Core.Modules;

namespace MoeLora.Core.Peft;

/// <summary>
/// Reproduces <c>get_peft_model(model, LoraConfig(...))</c> on a <see cref="ModuleTree"/>: PEFT's config rewrites,
/// module matching, parameter targeting, wrapper nesting, tying, bias modes, modules_to_save and counting
/// (peft-semantics §0-§4). Errors PEFT would raise become <see cref="PeftConfigException"/>s with PEFT's wording.
/// </summary>
public static class AdapterPlanner
{
    private const string Prefix = "base_model.model.";
    private const int MinTargetModulesForOptimization = 20;

    public static AdapterPlan Plan(ModelSpec spec, LoraConfig requested, PeftVersion? peftVersion = null)
    {
        var version = peftVersion ?? (spec.Layout == Layout.V4 && spec.DerivedLabel is null ? PeftVersion.V0_17 : PeftVersion.Default);
        requested.Validate();
        var tree = spec.Tree;
        var warnings = new List<string>();
        var cfg = requested;

        // Task-type heads are added to modules_to_save before injection (and so excluded from matching):
        // PeftModelForSequenceClassification / ForTokenClassification add classifier and score, ForQuestionAnswering qa_outputs.
        if (cfg.TaskType is "SEQ_CLS" or "TOKEN_CLS")
            cfg = cfg with { ModulesToSave = [.. cfg.ModulesToSave ?? [], "classifier", "score"] };
        else if (cfg.TaskType is "QUESTION_ANS")
            cfg = cfg with { ModulesToSave = [.. cfg.ModulesToSave ?? [], "qa_outputs"] };

        cfg = MoeConversion.Apply(cfg, spec, version, out var conversion);

        if (cfg.TargetModules is null)
        {
            var defaults = PeftModelTables.DefaultTargetModules(spec.ModelType);
            if (defaults is not null) cfg = cfg with { TargetModules = ModuleSelector.List(defaults) };
            else if (cfg.TargetParameters is null || cfg.TargetParameters.Count == 0)
                throw new PeftInjectionException("ValueError", "Please specify `target_modules` or `target_parameters`in `peft_config`");
        }

        if (cfg.TargetModules is { IsAllLinear: true })
            cfg = cfg with { TargetModules = ModuleSelector.List(AllLinear.FullNames(spec)) };

        if (cfg.TargetModules?.Names is { Count: >= MinTargetModulesForOptimization } many)
        {
            var minimal = MinimalTargets.Find(many, tree.Modules.Select(m => m.Name));
            if (minimal.Count < many.Count) cfg = cfg with { TargetModules = ModuleSelector.List(minimal) };
        }

        var tiedTargets = TieTargets(spec, version, ref cfg);

        var matcher = new TargetMatcher(cfg, version);
        var targets = new List<AdapterTarget>();
        bool anyExcluded = false, anyUnmatched = false;
        foreach (var module in tree.Modules)
        {
            if (module.Name.Length == 0 || tiedTargets.Contains(module.Name)) continue;
            switch (matcher.Check(module.Name))
            {
                case MatchResult.Excluded: anyExcluded = true; break;
                case MatchResult.NoMatch: anyUnmatched = true; break;
                default:
                    if (PeftModelTables.RejectsMambaTargets(spec.ModelType, module.LeafName))
                        throw new PeftInjectionException("ValueError",
                            $"[PEFT:PeftType.LORA] Module '{module.LeafName}' is incompatible with Mamba-based models (model_type='{spec.ModelType}'). " +
                            "Incompatible modules: {'out_proj', 'conv1d'}. Please remove it from `target_modules` to avoid compatibility issues.");
                    targets.Add(WrapModule(spec, cfg, module, tiedToEmbedding: false));
                    break;
            }
        }
        var moduleTargetCount = targets.Count;

        var wrappedModules = targets.Select(t => t.ModuleName).ToHashSet(StringComparer.Ordinal);
        // PEFT injects target_modules first; the first nn.Linear clears fan_in_fan_out on the shared config.
        var fanInFanOut = cfg.FanInFanOut && targets.All(t => t.Kind != AdapterKind.Linear);
        var parameterTargets = cfg.TargetParameters is { Count: > 0 } tp
            ? WrapParameters(spec, cfg with { FanInFanOut = fanInFanOut }, version, tp, wrappedModules)
            : [];
        targets.AddRange(parameterTargets);

        foreach (var name in tiedTargets)
            targets.Add(WrapModule(spec, cfg, tree.Find(name)!, tiedToEmbedding: true));

        if (targets.Count == 0) throw NothingMatched(cfg, anyExcluded, anyUnmatched).WithHint(TargetHint(spec));
        if (cfg.ExcludeModules is not null && !anyExcluded)
            warnings.Add($"You have passed exclude_modules={cfg.ExcludeModules} but no modules were excluded. Please check that exclude_modules was set correctly.");
        if (cfg.TargetModules is { } tm && moduleTargetCount == 0 && parameterTargets.Count > 0 && (tm.IsPattern || tm.Names!.Count > 0))
            warnings.Add($"target_modules={tm} were set but no module was matched.");
        if (cfg.TargetParameters is { Count: > 0 } && parameterTargets.Count == 0)
            warnings.Add($"target_parameters=[{string.Join(", ", cfg.TargetParameters)}] were set but no parameter was matched.");

        if (cfg.FanInFanOut && targets.Any(t => t.Kind == AdapterKind.Linear))
        {
            // dispatch_default resets the shared config's flag at the first nn.Linear (see WrapParameters).
            warnings.Add("fan_in_fan_out is set to True but the target module is `torch.nn.Linear`. Setting fan_in_fan_out to False.");
            cfg = cfg with { FanInFanOut = false };
        }

        var extras = new List<TrainableExtra>();
        var savedOnly = new List<AdapterTensor>();
        var depth = WrapDepths(targets);
        AddBiasExtras(spec, cfg, version, targets, depth, extras, savedOnly);
        if (cfg.TrainableTokenIndices is null) AddEmbeddingBaseWeights(spec, cfg, targets, savedOnly);
        AddModulesToSave(spec, cfg, version, extras, savedOnly);
        TrainableTokens.Add(spec, cfg, targets, extras, warnings);
        var ordered = OrderTrainable(tree, targets, extras);

        return new AdapterPlan
        {
            Spec = spec,
            Version = version,
            Requested = requested,
            Effective = cfg,
            Conversion = conversion,
            Targets = targets,
            Extras = extras,
            PeftWarnings = warnings,
            TrainableTensors = ordered.Where(t => t.Trainable).ToList(),
            AdapterTensors = ordered,
            SavedOnly = savedOnly,
        };
    }

    /// <summary>PEFT's not-found errors (NoMatchingPeftModuleError, a ValueError subclass), with its wording.</summary>
    private static PeftInjectionException NothingMatched(LoraConfig cfg, bool anyExcluded, bool anyUnmatched)
    {
        if (anyExcluded && !anyUnmatched)
            return new("NoMatchingPeftModuleError", "All modules were excluded. This is likely unintended. Check your `target_modules`, `exclude_modules` and `modules_to_save` configuration.");
        var tm = cfg.TargetModules;
        var noModuleTargets = tm is null || (tm.Names is { Count: 0 });
        if (!anyExcluded && noModuleTargets)
            return new("NoMatchingPeftModuleError", "No `target_modules` passed but also no `target_parameters` found. Please check the values for these arguments.");
        if (!anyExcluded)
        {
            var shown = tm!.Pattern ?? "{" + string.Join(", ", tm.Names!.Order(StringComparer.Ordinal).Select(n => $"'{n}'")) + "}";
            var msg = $"Target modules {shown} not found in the base model. Please check the target modules and try again.";
            if (cfg.LayersToTransform is not null)
                msg += $" Note: You specified 'layers_to_transform': {(cfg.LayersToTransformIsInt ? cfg.LayersToTransform[0].ToString(System.Globalization.CultureInfo.InvariantCulture) : "[" + string.Join(", ", cfg.LayersToTransform) + "]")}.";
            if (cfg.LayersPattern is not null) msg += $" You also specified 'layers_pattern': {string.Join(", ", cfg.LayersPattern)}.";
            return new("NoMatchingPeftModuleError", msg);
        }
        return new("NoMatchingPeftModuleError", "No modules were targeted for adaptation. This might be caused by a combination of mismatched target modules and excluded modules. Please check your `target_modules` and `exclude_modules` configuration. You may also have only targeted modules that are marked to be saved (`modules_to_save`).");
    }

    /// <summary>What this model does offer to target: its Linear layer names and fused expert parameters.</summary>
    private static string TargetHint(ModelSpec spec)
    {
        var linear = spec.Tree.Modules.Where(m => m.Kind is ModuleKind.Linear or ModuleKind.Embedding).Select(m => m.LeafName).Distinct().Take(16).ToList();
        var experts = Analysis.Findings.ExpertTargetParameters(spec);
        return $"this model's Linear/Embedding names: {string.Join(", ", linear)}" +
               (experts.Count > 0 ? $"; its fused experts are target_parameters {string.Join(", ", experts)}" : "");
    }

    private static (int R, double Alpha, double Scaling) RankAndAlpha(LoraConfig cfg, string key)
    {
        var r = TargetMatcher.PatternValue(cfg.RankPattern, key) ?? cfg.R;
        var alpha = TargetMatcher.PatternValue(cfg.AlphaPattern, key) ?? cfg.LoraAlpha;
        var scaling = cfg.UseRslora ? alpha / Math.Sqrt(r) : alpha / r;
        return (r, alpha, scaling);
    }

    /// <summary><c>dispatch_default</c> for a matched module: Linear, Embedding or ConvNd, anything else is unsupported.</summary>
    private static AdapterTarget WrapModule(ModelSpec spec, LoraConfig cfg, ModuleNode module, bool tiedToEmbedding)
    {
        if (module.Kind is not (ModuleKind.Linear or ModuleKind.Embedding or ModuleKind.Conv))
        {
            throw new PeftInjectionException("ValueError",
                $"Target module {module.ClassName}() is not supported. Currently, only the following modules are supported: " +
                "`torch.nn.Linear`, `torch.nn.Embedding`, `torch.nn.Conv1d`, `torch.nn.Conv2d`, `torch.nn.Conv3d`, " +
                "`transformers.pytorch_utils.Conv1D`, `torch.nn.MultiheadAttention.`." +
                $" (module '{module.Name}')");
        }
        var (r, alpha, scaling) = RankAndAlpha(cfg, module.Name);
        var p = Prefix + module.Name;
        var tensors = new List<AdapterTensor>();
        long inF = module.InFeatures, outF = module.OutFeatures;
        if (module.Kind == ModuleKind.Embedding && cfg.LoraBias)
            throw new PeftInjectionException("ValueError", "lora_bias=True is not supported for Embedding.");
        var init = LoraInit.Classify(cfg.InitLoraWeights);
        CheckModuleInit(cfg, module, init, r, inF, outF);
        // The MiCA variant freezes lora_B (frozen_peft_weight_names): still allocated and saved, not trained.
        var trainB = init != LoraInitKind.Mica;
        if (module.Kind == ModuleKind.Embedding)
        {
            tensors.Add(new($"{p}.lora_embedding_A.default", $"{p}.lora_embedding_A", [r, inF]));
            tensors.Add(new($"{p}.lora_embedding_B.default", $"{p}.lora_embedding_B", [outF, r], trainB));
        }
        else if (module.Kind == ModuleKind.Conv)
        {
            // _ConvNd.update_layer (groups = 1): lora_A = conv(in, r, kernel, stride), lora_B = conv(r, out, 1×…×1).
            var kernel = module.Parameter("weight")!.Shape[2..];
            tensors.Add(new($"{p}.lora_A.default.weight", $"{p}.lora_A.weight", [r, inF, .. kernel]));
            tensors.Add(new($"{p}.lora_B.default.weight", $"{p}.lora_B.weight", [outF, r, .. kernel.Select(_ => 1L)]));
            if (cfg.LoraBias) tensors.Add(new($"{p}.lora_B.default.bias", $"{p}.lora_B.bias", [outF]));
        }
        else
        {
            tensors.Add(new($"{p}.lora_A.default.weight", $"{p}.lora_A.weight", [r, inF]));
            tensors.Add(new($"{p}.lora_B.default.weight", $"{p}.lora_B.weight", [outF, r], trainB));
            if (cfg.LoraBias) tensors.Add(new($"{p}.lora_B.default.bias", $"{p}.lora_B.bias", [outF]));
        }
        if (cfg.UseDora)
        {
            // DoRA's conv magnitude is the weight norm over all but dim 0, kept and transposed: [1, out, 1, …].
            long[] magnitude = module.Kind == ModuleKind.Conv ? [1, outF, .. module.Parameter("weight")!.Shape[2..].Select(_ => 1L)] : [outF];
            tensors.Add(new($"{p}.lora_magnitude_vector.default.weight", $"{p}.lora_magnitude_vector", magnitude));
        }

        return new AdapterTarget
        {
            Name = module.Name,
            ModuleName = module.Name,
            Kind = module.Kind switch { ModuleKind.Embedding => AdapterKind.Embedding, ModuleKind.Conv => AdapterKind.Conv, _ => AdapterKind.Linear },
            BaseClass = module.ClassName,
            Location = module.Location,
            Layer = module.LayerIndex,
            R = r,
            Alpha = alpha,
            Scaling = scaling,
            InFeatures = inF,
            OutFeatures = outF,
            NumExperts = 1,
            BaseShape = module.Parameter("weight")?.Shape ?? [outF, inF],
            WrapperPath = module.Name,
            Dora = cfg.UseDora,
            TiedToEmbedding = tiedToEmbedding,
            Tensors = tensors,
        };
    }

    /// <summary>
    /// update_layer of lora.Linear / lora.Embedding: the variant lookup (only DoRA and MiCA are planned, and not
    /// together), then the init dispatch's own errors.
    /// </summary>
    private static void CheckModuleInit(LoraConfig cfg, ModuleNode module, LoraInitKind init, int r, long inF, long outF)
    {
        if (init == LoraInitKind.Mica && cfg.UseDora)
            throw new PeftInjectionException("ValueError", "Invalid or unsupported variant combination: ('mica', 'use_dora')");
        var embedding = module.Kind == ModuleKind.Embedding;
        if ((init is LoraInitKind.Mica or LoraInitKind.MicaInitOnly) && (r > Math.Min(inF, outF)))
        {
            // Linear: weight (out, in); Embedding: weight (num_embeddings, embedding_dim) = (in, out).
            throw new PeftInjectionException("ValueError", embedding
                ? $"MiCA requires `r` <= min(num_embeddings, embedding_dim) but got r={r} for an embedding layer with weight shape ({inF}, {outF}) (max usable r is {Math.Min(inF, outF)})."
                : $"MiCA requires `r` <= min(in_features, out_features) but got r={r} for a layer with weight shape ({outF}, {inF}) (max usable r is {Math.Min(inF, outF)}).");
        }
        // lora.Embedding has no orthogonal branch and its reset ignores the value: only Linear layers check these.
        if (embedding) return;
        if (init == LoraInitKind.Orthogonal && r % 2 != 0)
            throw new PeftInjectionException("ValueError", $"Orthogonal initialization requires the LoRA rank to be even, got {r} instead.");
        if (init == LoraInitKind.Unknown)
            throw new PeftInjectionException("ValueError", $"Unknown initialization init_lora_weights={LoraInit.PyRepr(cfg.InitLoraWeights)}");
    }

    /// <summary>ParamWrapper.update_layer: no LoRA variant at all, and only the inits that need no base <c>.weight</c>.</summary>
    private static void CheckParamWrapperInit(LoraConfig cfg, ModuleNode module, ParameterNode param)
    {
        switch (LoraInit.Classify(cfg.InitLoraWeights))
        {
            case LoraInitKind.Mica:
                throw new PeftInjectionException("ValueError", "Invalid or unsupported variant combination: ('mica',)");
            case LoraInitKind.MicaInitOnly or LoraInitKind.Unknown:
                // ParamWrapper has no mica branch: any other string reaches reset_lora_parameters.
                throw new PeftInjectionException("ValueError", $"Unknown initialization init_lora_weights={LoraInit.PyRepr(cfg.InitLoraWeights)}");
            case LoraInitKind.Orthogonal:
                // orthogonal_init reads get_base_layer().weight (absent on fused expert modules) and builds (r, in)
                // factors, not the (r * experts, in) ones a 3-D parameter gets.
                throw new PeftConfigException($"init_lora_weights='orthogonal' with target_parameters ('{param.Name}' of {module.ClassName}) is not supported: MoeLora cannot plan it yet");
        }
    }

    /// <summary>
    /// <c>_inject_parameters</c>: exact or dot-suffix match on <c>module.param</c>, ignoring exclude_modules and the
    /// layer filter. Several parameters of one module nest: the first registered is innermost.
    /// </summary>
    private static List<AdapterTarget> WrapParameters(ModelSpec spec, LoraConfig cfg, PeftVersion version,
        IReadOnlyList<string> targetParameters, HashSet<string> wrappedModules)
    {
        var targets = targetParameters.Distinct(StringComparer.Ordinal).Order(StringComparer.Ordinal).ToList();
        var exact = targets.ToHashSet(StringComparer.Ordinal);
        var suffixes = targets.Select(t => "." + t).ToArray();
        bool Matches(ParameterNode p)
        {
            if (p.IsTied) return false;
            if (exact.Contains(p.Name)) return true;
            foreach (var suffix in suffixes)
                if (p.Name.EndsWith(suffix, StringComparison.Ordinal)) return true;
            return false;
        }
        var result = new List<AdapterTarget>();
        foreach (var module in spec.Tree.Modules)
        {
            // A list only for the few modules with a matching parameter (one per module allocated about as much as
            // the targets themselves).
            List<ParameterNode>? matched = null;
            foreach (var p in module.Parameters)
                if (Matches(p)) (matched ??= []).Add(p);
            if (matched is null) continue;
            if (module.Name.Length == 0 && version.RejectsRootParameters)
                throw new PeftInjectionException("ValueError", $"Targeting the parameter '{matched[0].Name}' of the root module is not supported.");
            if (wrappedModules.Contains(module.Name))
                throw new PeftInjectionException("ValueError",
                    $"Trying to wrap the parameter '{matched[0].LocalName}' of '{module.Name}', which target_modules already adapted; do not target it with both target_modules and target_parameters.");
            if (cfg.LoraDropout != 0)
                throw new PeftInjectionException("ValueError", $"lora.ParamWrapper does not work with lora_dropout != 0 (got {cfg.LoraDropout}).");
            if (cfg.UseDora) throw new PeftInjectionException("ValueError", "lora.ParamWrapper does not work with DoRA (use_dora=True).");
            if (cfg.LoraBias) throw new PeftInjectionException("ValueError", "lora.ParamWrapper does not work with lora_bias=True.");
            if (cfg.FanInFanOut) throw new PeftInjectionException("ValueError", "lora.ParamWrapper does not work with fan_in_fan_out.");
            CheckParamWrapperInit(cfg, module, matched[0]);

            for (var k = 0; k < matched.Count; k++)
            {
                var param = matched[k];
                var wrapper = module.Name + string.Concat(Enumerable.Repeat(".base_layer", matched.Count - 1 - k));
                result.Add(WrapParameter(spec, cfg, version, module, param, wrapper));
            }
        }
        return result;
    }

    private static AdapterTarget WrapParameter(ModelSpec spec, LoraConfig cfg, PeftVersion version, ModuleNode module,
        ParameterNode param, string wrapperPath)
    {
        long experts, inF, outF;
        var s = param.Shape;
        if (s.Length == 2)
        {
            (experts, inF, outF) = (1, s[1], s[0]);
        }
        else if (s.Length == 3)
        {
            experts = s[0];
            var swap = version.Orientation switch
            {
                ExpertOrientation.SwapUnlessTransposed => !module.IsTransposed,
                ExpertOrientation.SwapIfTransposed => module.IsTransposed,
                // peft ≤ 0.18 under transformers 5: transformers patches update_layer to swap fused expert params.
                _ => spec.Layout == Layout.V5 && PeftModelTables.HasCheckpointConversion(spec.ModelType)
                     && param.LocalName is "gate_up_proj" or "down_proj",
            };
            (inF, outF) = swap ? (s[2], s[1]) : (s[1], s[2]);
        }
        else
        {
            throw new PeftInjectionException("ValueError",
                $"lora.ParamWrapper only supports 2-D and 3-D parameters, but '{param.Name}' has shape {param.ShapeText}.");
        }

        var key = module.Name + "." + param.LocalName;
        var (r, alpha, scaling) = RankAndAlpha(cfg, key);
        var p = Prefix + wrapperPath;
        return new AdapterTarget
        {
            Name = key,
            ModuleName = module.Name,
            ParameterName = param.LocalName,
            Kind = AdapterKind.Parameter,
            BaseClass = module.ClassName,
            Location = module.Location,
            Layer = module.LayerIndex,
            R = r,
            Alpha = alpha,
            Scaling = scaling,
            InFeatures = inF,
            OutFeatures = outF,
            NumExperts = experts,
            BaseShape = s,
            WrapperPath = wrapperPath,
            Tensors =
            [
                new($"{p}.lora_A.default.weight", $"{p}.lora_A.weight", [r * experts, inF]),
                new($"{p}.lora_B.default.weight", $"{p}.lora_B.weight", [outF, r * experts]),
            ],
        };
    }

    /// <summary>
    /// <c>_add_targets_to_tie</c> (peft ≥ 0.19, ensure_weight_tying, tied embeddings): targeting embed_tokens or
    /// lm_head adapts both, the LM head's adapter sharing the embedding adapter's storage (counted twice).
    /// Returns the deferred (tied) module names.
    /// </summary>
    private static HashSet<string> TieTargets(ModelSpec spec, PeftVersion version, ref LoraConfig cfg)
    {
        var tied = new HashSet<string>(StringComparer.Ordinal);
        var tm = cfg.TargetModules;
        // PEFT compares the child attribute name with full names, so tying only works for a top-level head.
        if (!version.TiesTargetModules || !cfg.EnsureWeightTying || !spec.TieWordEmbeddings || tm is null
            || spec.OutputEmbeddings.Contains('.', StringComparison.Ordinal))
            return tied;
        string[] embeddingNames = ["embed_tokens", "lm_head"];
        var hits = tm.Pattern is not null
            ? embeddingNames.Any(n => PyRegex.FullMatch(tm.Pattern, n))
            : tm.Names!.Any(n => embeddingNames.Contains(n[(n.LastIndexOf('.') + 1)..]));
        if (!hits) return tied;

        tied.Add(spec.OutputEmbeddings);
        if (tm.Pattern is not null)
        {
            cfg = cfg with { TargetModules = ModuleSelector.Regex($"(?:{tm.Pattern}|^{System.Text.RegularExpressions.Regex.Escape(spec.InputEmbeddings)}$)") };
        }
        else
        {
            var names = tm.Names!.Where(n => n != spec.OutputEmbeddings && n != "lm_head").ToList();
            names.Add(spec.InputEmbeddings);
            cfg = cfg with { TargetModules = ModuleSelector.List(names) };
        }
        return tied;
    }

    /// <summary>
    /// <c>save_embedding_layers="auto"</c>: when target_modules names <c>embed_tokens</c> or <c>lm_head</c> (set membership,
    /// or a substring of a regex), save_pretrained also writes the base parameters (weight, bias if any) of each embedding layer that carries LoRA.
    /// After PEFT's tying rewrite the names are full (<c>model.embed_tokens</c>), so nothing extra is saved then.
    /// </summary>
    private static void AddEmbeddingBaseWeights(ModelSpec spec, LoraConfig cfg, List<AdapterTarget> targets, List<AdapterTensor> savedOnly)
    {
        var tm = cfg.TargetModules;
        if (tm is null) return;
        string[] names = ["embed_tokens", "lm_head"];
        var named = tm.Pattern is not null ? names.Any(n => tm.Pattern.Contains(n, StringComparison.Ordinal)) : names.Any(n => tm.Names!.Contains(n));
        if (!named) return;
        foreach (var moduleName in new[] { spec.InputEmbeddings, spec.OutputEmbeddings })
        {
            if (targets.All(t => t.ModuleName != moduleName || t.Kind == AdapterKind.Parameter)) continue;
            // PEFT saves every state_dict key under the layer's name, so a biased lm_head (PhiMoE's lm_head_bias)
            // also writes base_layer.bias.
            foreach (var param in spec.Tree.Find(moduleName)!.Parameters)
            {
                var key = $"{Prefix}{moduleName}.base_layer.{param.LocalName}";
                savedOnly.Add(new AdapterTensor(key, key, param.Shape));
            }
        }
    }

    /// <summary>How many <c>.base_layer</c> levels sit between each wrapped module and its original parameters.</summary>
    private static Dictionary<string, int> WrapDepths(IEnumerable<AdapterTarget> targets)
    {
        var depth = new Dictionary<string, int>(StringComparer.Ordinal);
        foreach (var t in targets) depth[t.ModuleName] = depth.GetValueOrDefault(t.ModuleName) + 1;
        return depth;
    }

    /// <summary>The runtime name of a base parameter once its module is wrapped <paramref name="depth"/> times.</summary>
    private static string WrappedName(ParameterNode p, string owner, int depth)
    {
        var local = owner.Length == 0 ? p.Name : p.Name[(owner.Length + 1)..];
        return Prefix + (owner.Length == 0 ? "" : owner + ".") + string.Concat(Enumerable.Repeat("base_layer.", depth)) + local;
    }

    /// <summary>
    /// <c>bias="all"</c>: base biases become trainable and are saved; up to 0.20 every name containing "bias"
    /// (gpt-oss <c>gate_up_proj_bias</c> too), from 0.21 only names ending in <c>.bias</c> (checked).
    /// <c>bias="lora_only"</c>: the bias of each adapted layer, saved as <c>...base_layer.bias</c>.
    /// </summary>
    private static bool IsBiasForAll(ParameterNode p, PeftVersion version) =>
        version.BiasAllMatchesSuffixOnly ? p.LocalName == "bias" : p.Name.Contains("bias", StringComparison.Ordinal);

    private static void AddBiasExtras(ModelSpec spec, LoraConfig cfg, PeftVersion version, List<AdapterTarget> targets,
        Dictionary<string, int> depth, List<TrainableExtra> extras, List<AdapterTensor> savedOnly)
    {
        if (cfg.Bias == "none") return;
        var tree = spec.Tree;
        if (cfg.Bias == "all")
        {
            foreach (var module in tree.Modules)
            {
                var d = depth.GetValueOrDefault(module.Name);
                foreach (var p in module.Parameters.Where(p => !p.IsTied && IsBiasForAll(p, version)))
                {
                    var name = WrappedName(p, module.Name, d);
                    extras.Add(new TrainableExtra(name, name, p.Shape, "bias=all", CountsInTotal: false));
                }
            }
            return;
        }
        foreach (var moduleName in targets.Select(t => t.ModuleName).Distinct(StringComparer.Ordinal))
        {
            var module = tree.Find(moduleName)!;
            if (module.Parameter("bias") is { IsTied: false } bias)
            {
                var name = WrappedName(bias, module.Name, depth[module.Name]);
                extras.Add(new TrainableExtra(name, name, bias.Shape, "bias=lora_only", CountsInTotal: false));
            }
        }
    }

    /// <summary>
    /// <c>modules_to_save</c>: every module whose name ends with an entry (plain endswith) gets a trainable deep copy,
    /// counted in both totals. With ensure_weight_tying (≥ 0.18) the tied embedding/LM-head copies share one weight.
    /// </summary>
    private static void AddModulesToSave(ModelSpec spec, LoraConfig cfg, PeftVersion version, List<TrainableExtra> extras,
        List<AdapterTensor> savedOnly)
    {
        if (cfg.ModulesToSave is not { Count: > 0 } entries) return;
        var tree = spec.Tree;
        var wrapped = tree.Modules.Where(m => m.Name.Length > 0 && entries.Any(e => m.Name.EndsWith(e, StringComparison.Ordinal))).ToList();
        var tying = version.TiesModulesToSave && cfg.EnsureWeightTying && spec.TieWordEmbeddings;
        if (tying && wrapped.Any(m => m.Name == spec.InputEmbeddings || m.Name == spec.OutputEmbeddings))
        {
            // Both ends get wrappers; the LM head's copy reuses the embedding copy's Parameter (counted once).
            foreach (var name in new[] { spec.InputEmbeddings, spec.OutputEmbeddings })
                if (wrapped.All(m => m.Name != name)) wrapped.Add(tree.Find(name)!);
        }
        var seen = new HashSet<string>(StringComparer.Ordinal);
        foreach (var module in wrapped.OrderBy(m => IndexOf(tree, m)))
        {
            foreach (var p in tree.SubtreeParameters(module))
            {
                var sub = p.Name[(module.Name.Length + 1)..];
                if (tying && p.IsTied && module.Name == spec.OutputEmbeddings)
                {
                    // The shared Parameter is counted once but saved under both wrappers' keys.
                    savedOnly.Add(new AdapterTensor($"{Prefix}{module.Name}.modules_to_save.default.{sub}", $"{Prefix}{module.Name}.{sub}", p.Shape));
                    continue;
                }
                var runtime = $"{Prefix}{module.Name}.modules_to_save.default.{sub}";
                if (seen.Add(runtime))
                    extras.Add(new TrainableExtra(runtime, $"{Prefix}{module.Name}.{sub}", p.Shape, "modules_to_save", CountsInTotal: true));
            }
        }
    }

    private static int IndexOf(ModuleTree tree, ModuleNode m)
    {
        for (var i = 0; i < tree.Modules.Count; i++) if (ReferenceEquals(tree.Modules[i], m)) return i;
        return int.MaxValue;
    }

    /// <summary>Trainable tensors in PeftModel.named_parameters() order: module by module, inner wrappers first.</summary>
    private static List<AdapterTensor> OrderTrainable(ModuleTree tree, List<AdapterTarget> targets, List<TrainableExtra> extras)
    {
        // Grouped by hand: LINQ's GroupBy/ToDictionary was a notable part of each plan, and a report plans three times.
        var byModule = new Dictionary<string, List<AdapterTarget>>(StringComparer.Ordinal);
        foreach (var t in targets)
        {
            if (!byModule.TryGetValue(t.ModuleName, out var group)) byModule[t.ModuleName] = group = [];
            group.Add(t);
        }
        var extraByModule = new Dictionary<string, List<AdapterTensor>>(StringComparer.Ordinal);
        foreach (var e in extras)
        {
            var module = ExtraOwner(tree, e.RuntimeName);
            if (!extraByModule.TryGetValue(module, out var list)) extraByModule[module] = list = [];
            list.Add(new AdapterTensor(e.RuntimeName, e.SavedKey, e.Shape));
        }
        var ordered = new List<AdapterTensor>();
        foreach (var m in tree.Modules)
        {
            if (extraByModule.TryGetValue(m.Name, out var ex)) ordered.AddRange(ex);
            if (!byModule.TryGetValue(m.Name, out var group)) continue;
            // Outermost wrapper first (a stable order: nested ParamWrappers of one module).
            foreach (var t in group.Count == 1 ? (IEnumerable<AdapterTarget>)group : group.OrderByDescending(t => t.WrapperPath.Length))
                ordered.AddRange(t.Tensors);
        }
        return ordered;
    }

    /// <summary>The tree module an extra tensor belongs to (its runtime name without wrapper segments).</summary>
    private static string ExtraOwner(ModuleTree tree, string runtimeName)
    {
        var name = runtimeName[Prefix.Length..];
        foreach (var wrapper in new[] { ".modules_to_save.", ".token_adapter." })
        {
            var cut = name.IndexOf(wrapper, StringComparison.Ordinal);
            if (cut >= 0) return name[..cut];
        }
        name = name.Replace(".base_layer", "", StringComparison.Ordinal);
        var owner = name[..Math.Max(0, name.LastIndexOf('.'))];
        return tree.Find(owner) is not null ? owner : "";
    }
}

/// <summary>PEFT's <c>_find_minimal_target_modules</c>: the shortest dot-suffixes that match the targets only.</summary>
public static class MinimalTargets
{
    public static IReadOnlyList<string> Find(IReadOnlyList<string> targets, IEnumerable<string> allModuleNames)
    {
        var targetSet = targets.ToHashSet(StringComparer.Ordinal);
        // PEFT passes the module names that match no target (exactly or as a suffix).
        var others = allModuleNames.Where(n => !TargetMatcher.IsExactOrSuffix(n, targets, targetSet)).ToList();
        var otherSuffixes = new HashSet<string>(others.SelectMany(Suffixes), StringComparer.Ordinal);
        var required = new HashSet<string>(StringComparer.Ordinal);
        var ordered = targetSet.Select(t => (t, s: Suffixes(t))).OrderBy(x => x.s, SuffixListComparer.Instance);
        foreach (var (_, suffixes) in ordered)
        {
            foreach (var suffix in suffixes)
            {
                if (required.Contains(suffix) || !otherSuffixes.Contains(suffix))
                {
                    required.Add(suffix);
                    break;
                }
            }
        }
        return required.Count == 0 ? targetSet.ToList() : required.ToList();
    }

    /// <summary>Suffixes from shortest (last segment) to the full name.</summary>
    private static List<string> Suffixes(string name)
    {
        var parts = name.Split('.');
        return Enumerable.Range(0, parts.Length).Select(i => string.Join('.', parts[i..])).Reverse().ToList();
    }

    /// <summary>Python's ordering of lists of strings (lexicographic, code-point order).</summary>
    private sealed class SuffixListComparer : IComparer<List<string>>
    {
        public static readonly SuffixListComparer Instance = new();

        public int Compare(List<string>? x, List<string>? y)
        {
            for (var i = 0; i < Math.Min(x!.Count, y!.Count); i++)
            {
                var c = string.CompareOrdinal(x[i], y[i]);
                if (c != 0) return c;
            }
            return x.Count.CompareTo(y.Count);
        }
    }
}
