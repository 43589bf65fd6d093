using MoeLora.Core.Config;
using MoeLora.Core.Modules;

namespace MoeLora.Core.Architectures;

/// <summary>One transformers model family: how its config becomes a module tree.</summary>
public interface IArchitecture
{
    /// <summary>The <c>model_type</c> values this family builds.</summary>
    IReadOnlyList<string> ModelTypes { get; }

    ModelSpec Build(ModelConfig config, Layout layout);
}

/// <summary>Finds the family for a <c>model_type</c> and builds it.</summary>
public static class ArchitectureRegistry
{
    private static readonly IArchitecture[] Families =
    [
        new LlamaFamily(),
        new MixtralFamily(),
        new QwenMoeFamily(),
        new OlmoeFamily(),
        new DeepseekFamily(),
        new Llama4Family(),
        new GptOssFamily(),
        new DbrxFamily(),
        new Glm4MoeFamily(),
        new PhimoeFamily(),
        new GraniteMoeFamily(),
        new Qwen3NextFamily(),
        new JambaFamily(),
        new Glm4MoeLiteFamily(),
        new Mistral4Family(),
        new SolarOpenFamily(),
        new ExaoneMoeFamily(),
        new AfmoeFamily(),
        new Ernie45MoeFamily(),
        new Ernie45VLMoeFamily(),
        new HYV3Family(),
        new MiMoV2FlashFamily(),
        new LongcatFlashFamily(),
        new Glm4vMoeFamily(),
        new KimiK25Family(),
        new DeepseekV4Family(),
        new MiniMaxFamily(),
        new MiniMaxM3Family(),
        new LagunaFamily(),
        new Cohere2MoeFamily(),
        new JetMoeFamily(),
        new AxkFamily(),
        new Qwen3_5MoeFamily(),
        new Qwen4ExpFamily(),
        new Qwen3VLMoeFamily(),
        new AriaFamily(),
        new DogeFamily(),
        new NemotronHFamily(),
        new InklingFamily(),
        new Dots1Family(),
        new HunYuanMoeFamily(),
        new Lfm2MoeFamily(),
        new GraniteMoeHybridFamily(),
        new KimiLinearFamily(),
        new Qwen3OmniMoeFamily(),
        new HyV4Family(),
        new Glm5NextFamily(),
        new ZayaFamily(),
        new Step3p7Family(),
        new DeepseekOcr2Family(),
    ];

    private static readonly Dictionary<string, IArchitecture> ByType =
        Families.SelectMany(f => f.ModelTypes.Select(t => (t, f))).ToDictionary(x => x.t, x => x.f, StringComparer.Ordinal);

    /// <summary>
    /// MoE model types transformers 5.17 builds only as a class that is neither a causal LM nor an image-text-to-text
    /// model (the classes PEFT fine-tuning loads), with what to load instead.
    /// </summary>
    private static readonly Dictionary<string, string> NoLanguageModelClass = new(StringComparer.Ordinal)
    {
        ["qwen3_omni_moe"] = "is Qwen3-Omni's thinker, talker and code2wav together, which transformers 5.17 builds only as "
            + "Qwen3OmniMoeForConditionalGeneration (no causal-LM or image-text-to-text class); its language model is the "
            + "thinker: analyse its thinker_config (model_type qwen3_omni_moe_thinker) as the config instead",
    };

    public static IReadOnlyList<string> SupportedModelTypes { get; } = ByType.Keys.Order(StringComparer.Ordinal).ToList();

    public static bool IsSupported(string modelType) => ByType.ContainsKey(modelType);

    /// <summary>Builds the model a config describes; unknown or missing model_type is a one-line error.</summary>
    public static ModelSpec Build(ModelConfig config, Layout layout)
    {
        var type = config.ModelType
            ?? throw new ConfigException("config.json has no 'model_type'; supported model types: " + string.Join(", ", SupportedModelTypes));
        if (!ByType.TryGetValue(type, out var family))
            throw new ConfigException(NoLanguageModelClass.TryGetValue(type, out var why) ? $"model_type '{type}' {why}"
                : $"model_type '{type}' is not supported; supported model types: {string.Join(", ", SupportedModelTypes)}");
        return family.Build(config, layout);
    }
}
