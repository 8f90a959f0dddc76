<?php
/**
 * What salestrainer_sidecar_enqueue() uses when the site cannot publish: it says what is missing.
 *
 * @package SalesTrainer_Sidecar
 */

defined( 'ABSPATH' ) || exit;

/**
 * Stands in for a publisher when the site is not configured: every enqueue() says what is missing.
 */
final class ST_Sidecar_Unconfigured_Publisher {

	/**
	 * What is missing.
	 *
	 * @var string
	 */
	private $reason;

	/**
	 * A publisher that refuses with $reason.
	 *
	 * @param string $reason What is missing.
	 */
	public function __construct( $reason ) {
		$this->reason = $reason;
	}

	/**
	 * Refuse.
	 *
	 * @return WP_Error
	 */
	public function enqueue() {
		return new WP_Error( 'salestrainer_not_configured', 'SalesTrainer Sidecar is not configured: ' . $this->reason );
	}
}
